"""Every recipe command in README.md and docs/*.md composes onto the typed schema and fits the world size its
launcher line gives (without launching): unknown keys, bad values, a layout that does not multiply to the world
size or a global batch that does not split into micro-batches on every data-parallel rank all fail here. A real
model (a vocabulary beyond the byte tokenizer's 259 ids) must be fed a token file, not bytes. The README's and
docs/checkpoints.md's commands are also run for real, in order (tests/integration/test_docs_runs.py)."""

from __future__ import annotations

import pytest

from automoe.train.build import check_layout
from tests.doc_commands import compose_job, documented_markdown, markdown_commands

BYTE_VOCAB = 259  # ByteTokenizer: 256 bytes + BOS/EOS/PAD; every source but `tokens` yields these ids
CASES = [cmd for path in documented_markdown() for cmd in markdown_commands(path)]


def test_the_docs_hold_recipe_commands():
    where = {c.where.split(":")[0] for c in CASES}
    assert {"README.md", "docs/multinode.md", "docs/checkpoints.md", "docs/configuration.md"} <= where, where


@pytest.mark.parametrize("cmd", CASES, ids=[c.id for c in CASES])
def test_documented_command_composes_for_its_world_size(cmd, tmp_path):
    job = compose_job(cmd, tmp_path)
    if cmd.prints_only:
        return
    dims = check_layout(job, cmd.world_size)
    assert dims.world_size == cmd.world_size
    if cmd.recipe == "pretrain.py" and job.model.vocab_size > BYTE_VOCAB:
        assert job.data.source == "tokens", (
            f"{cmd.where}: model.vocab_size={job.model.vocab_size} trained on data.source={job.data.source!r} "
            "(byte ids): use a token file"
        )


MULTINODE = [c for c in CASES if c.where.startswith("docs/multinode.md")]


@pytest.mark.parametrize("cmd", MULTINODE, ids=[c.id for c in MULTINODE])
def test_multinode_commands_set_batch_sequence_and_data(cmd, tmp_path):
    """Cluster-sized runs state what they train on: batch, sequence length and a token file, not the defaults
    of the 2-CPU main job (16 x 128 byte tokens)."""
    given = {a.split("=", 1)[0] for a in cmd.args}
    assert {
        "train.global_batch_size",
        "train.micro_batch_size",
        "data.seq_len",
        "data.source",
        "data.path",
    } <= given
    job = compose_job(cmd, tmp_path)
    assert job.data.source == "tokens" and job.data.seq_len >= 1024 and cmd.world_size >= 8

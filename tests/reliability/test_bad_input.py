"""The bad-input catalogue (docs/reliability.md): each mistake fails fast with a message naming the setting and
its value, before any collective where it can, and leaves every checkpoint already saved as it was.

Most kinds run in one process (the message is produced before the first collective, so every rank of a real job
produces it too); a few run under torchrun at world 2 to show no rank hangs, including ones raised after the
process groups and meshes exist.
"""

from __future__ import annotations

import hashlib
import pickle
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import HydraException

from automoe.data.token_file import TokenFileWriter
from automoe.parallel import DistEnv
from automoe.train import build_trainer
from automoe.train.checkpoint import MARKER
from tests.integration.recipe import FAST
from tests.reliability.launch import tail, torchrun
from tests.unit.train.conftest import make_job
from tests.unit.train.test_job_config import load


def error_text(exc: BaseException) -> str:
    """The message of an exception and of everything it was raised from (Hydra wraps the original)."""
    parts = []
    while exc is not None:
        parts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


def tree_digest(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `root`: equal before and after means nothing was touched."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# ---- 1. the config: composition and dataclass checks (no process started, nothing built) ----
CONFIG_CASES = [
    ("unknown key", ["train.stepz=3"], ["stepz"]),
    ("unknown nested key", ["model.moe.num_expertz=8"], ["num_expertz"]),
    ("wrong type", ["train.steps=many"], ["train.steps", "many"]),
    ("wrong type (bool)", ["checkpoint.async_save=perhaps"], ["async_save", "perhaps"]),
    ("unknown config group option", ["parallel=ep3"], ["parallel/ep3"]),
    (
        "top-k > experts",
        ["model.moe.num_activated_experts=16"],
        ["num_activated_experts=16", "num_experts=8"],
    ),
    (
        "experts not divisible by EP",
        ["model.moe.num_experts=7"],
        ["model.moe.num_experts=7", "parallel.ep=2"],
    ),
    ("CP does not divide the sequence", ["parallel.cp=3"], ["data.seq_len=128", "parallel.cp=3"]),
    (
        "sequence longer than the model supports",
        ["data.seq_len=512"],
        ["data.seq_len=512", "max_seq_len=256"],
    ),
    ("heads not a multiple of kv heads", ["model.num_kv_heads=3"], ["num_heads=4", "num_kv_heads=3"]),
    ("vocab size not positive", ["model.vocab_size=0"], ["vocab_size=0"]),
    (
        "global batch not a multiple of micro batch",
        ["train.micro_batch_size=5"],
        ["train.global_batch_size=16", "train.micro_batch_size=5"],
    ),
    ("non-positive steps", ["train.steps=0"], ["train.steps=0"]),
    ("stop_at_step beyond steps", ["train.stop_at_step=1000"], ["train.stop_at_step=1000"]),
    ("negative lr", ["optim.lr=-1e-3"], ["optim.lr=-0.001"]),
    ("beta out of range", ["optim.beta2=1.0"], ["optim.beta2=1.0"]),
    ("unknown lr schedule", ["optim.schedule=step"], ["optim.schedule='step'"]),
    ("unknown compute dtype", ["train.dtype=float16"], ["train.dtype='float16'"]),
    ("unknown nan policy", ["train.nan_policy=ignore"], ["train.nan_policy='ignore'"]),
    ("bad wandb mode", ["logging.wandb.mode=cloud"], ["logging.wandb.mode='cloud'"]),
    ("negative checkpoint interval", ["checkpoint.interval=-2"], ["checkpoint.interval=-2"]),
    ("negative keep_last_n", ["checkpoint.keep_last_n=-1"], ["checkpoint.keep_last_n=-1"]),
    ("blank resume", ["checkpoint.resume=' '"], ["checkpoint.resume=' '"]),
    (
        "non-positive collective timeout",
        ["parallel.collective_timeout_s=0"],
        ["parallel.collective_timeout_s=0"],
    ),
    (
        "unknown activation checkpointing",
        ["parallel.activation_checkpointing=some"],
        ["activation_checkpointing"],
    ),
    ("unknown data source", ["data.source=csv"], ["source='csv'"]),
    ("path-based source without a path", ["data.source=text"], ["DataConfig.path=None", "source='text'"]),
    ("validation fraction out of range", ["data.val_fraction=1.5"], ["val_fraction=1.5"]),
    (
        "output_dir under a file",
        ["output_dir=/etc/hostname/run"],
        ["output_dir='/etc/hostname/run'", "a file"],
    ),
]


@pytest.mark.timeout(60)
def test_config_mistakes_are_named():
    for kind, overrides, expected in CONFIG_CASES:
        start = time.perf_counter()
        with pytest.raises((ValueError, HydraException)) as info:
            load(*overrides)
        text = error_text(info.value)
        for fragment in expected:
            assert fragment in text, f"{kind}: {fragment!r} not in {text!r}"
        assert time.perf_counter() - start < 30, kind


# ---- 2. data and layout: raised while building, before the first collective ----
# Text sources use the byte tokenizer (259 ids): the model takes that vocabulary, so each case meets only its fault.
BYTE_VOCAB = "model.vocab_size=259"


def _data_cases(tmp: Path) -> list[tuple[str, int, list[str], list[str]]]:
    (tmp / "empty.txt").write_text("")
    (tmp / "empty_dir").mkdir()
    (tmp / "garbage.jsonl").write_bytes(b"\x00\x01 not json\n")
    with TokenFileWriter(tmp / "big_vocab.bin", vocab_size=1000, eos_id=999) as w:
        w.write(np.arange(0, 1000, dtype=np.int64) % 999)
    return [  # (kind, world size, overrides, expected fragments)
        (
            "missing data path",
            1,
            [BYTE_VOCAB, "data.source=text", f"data.path={tmp}/nope.txt"],
            ["DataConfig.path=", "nope.txt"],
        ),
        ("token file path is a directory", 1, ["data.source=tokens", f"data.path={tmp}"], [f"path='{tmp}'"]),
        (
            "unreadable (non-JSON) jsonl data",
            1,
            [BYTE_VOCAB, "data.source=jsonl", f"data.path={tmp}/garbage.jsonl"],
            ["garbage.jsonl:1", "invalid JSON"],
        ),
        (
            "empty data file",
            1,
            [BYTE_VOCAB, "data.source=text", f"data.path={tmp}/empty.txt"],
            ["empty.txt", "holds no text"],
        ),
        (
            "data directory without matching files",
            1,
            [BYTE_VOCAB, "data.source=text", f"data.path={tmp}/empty_dir"],
            ["empty_dir", "no files"],
        ),
        (
            "too little data for one sample",
            1,
            ["data.synthetic_num_tokens=20"],
            ["DataConfig.val_fraction=0.1", "20 tokens"],
        ),
        (
            "data vocab > model vocab (synthetic)",
            1,
            ["data.synthetic_vocab_size=64"],
            ["model.vocab_size=35", "67 ids"],
        ),
        (
            "token-file vocab > model vocab",
            1,
            ["data.source=tokens", f"data.path={tmp}/big_vocab.bin"],
            ["model.vocab_size=35", "vocab 1000"],
        ),
        (
            "global batch larger than the dataset",
            1,
            ["train.global_batch_size=4096", "train.micro_batch_size=4"],
            ["global_batch_size=4096", "exceeds"],
        ),
        (
            "world size does not match the layout",
            2,
            ["parallel.dp_shard=4"],
            ["dp_shard*cp = 1*4*1 = 4", "world size 2"],
        ),
        (
            "world size not divisible by dp_replicate*cp",
            3,
            ["parallel.dp_replicate=2"],
            ["world size 3", "dp_replicate*cp"],
        ),
        (
            "EP larger than the ranks it borrows",
            2,
            ["parallel.ep=4"],
            ["parallel.ep=4", "dp_shard*cp = 2*1 = 2"],
        ),
        (
            "world size not a product of the degrees with TP",
            2,
            ["parallel.tp=4"],
            ["world size 2", "dp_replicate*cp*tp = 1*1*4 = 4"],
        ),
        ("kv heads not divisible by TP", 2, ["parallel.tp=2"], ["model.num_kv_heads=1", "parallel.tp=2"]),
        (
            "heads not divisible by TP",
            4,
            ["parallel.tp=4", "model.num_kv_heads=2"],
            ["model.num_heads=2", "parallel.tp=4"],
        ),
        (
            "EP not a multiple of TP",
            4,
            ["parallel.tp=4", "parallel.ep=2", "model.num_heads=4", "model.num_kv_heads=4"],
            ["parallel.ep=2 must be 1 or a multiple of parallel.tp=4"],
        ),
    ]


@pytest.mark.timeout(120)
def test_data_and_layout_mistakes_are_named(tmp_path):
    for kind, world_size, overrides, expected in _data_cases(tmp_path):
        env = DistEnv(rank=0, local_rank=0, world_size=world_size, device=torch.device("cpu"))
        start = time.perf_counter()
        with pytest.raises(ValueError) as info:
            build_trainer(make_job(tmp_path / "out", *overrides), env)
        for fragment in expected:
            assert fragment in str(info.value), f"{kind}: {fragment!r} not in {info.value}"
        assert time.perf_counter() - start < 30, kind


# ---- 3. checkpoints: bad resume targets and damaged files, none of which may cost a saved checkpoint ----
@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A finished world-1 run with complete checkpoints step_2 and step_4."""
    out = tmp_path_factory.mktemp("saved")
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    build_trainer(make_job(out, "train.steps=4", "checkpoint.interval=2", "train.val_interval=0"), env).fit()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2", "step_4"]
    return out


class Hostile:
    """Unpickling this runs code: a safe loader must refuse it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _damage(ckpt: Path, how: str) -> None:
    if how == "state":
        (ckpt / "trainer_state.json").write_text('{"format": 1, "st')
    elif how == "rng":
        (ckpt / "rng" / "rank_0.json").write_text("[1, 2")
    elif how == "config":
        (ckpt / "config.yaml").unlink()
    elif how == "no_metadata":
        (ckpt / ".metadata").unlink()
    elif how == "truncated_shard":
        shard = ckpt / "__0_0.distcp"
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    elif how == "garbage_shard":
        shard = ckpt / "__0_0.distcp"
        shard.write_bytes(b"\x80" * shard.stat().st_size)
    elif how == "hostile_metadata":
        (ckpt / ".metadata").write_bytes(pickle.dumps(Hostile(ckpt.parent / "pwned")))


# (kind, resume relative to the saved run's checkpoints dir, where the run writes, damage, model overrides, expected)
CHECKPOINT_CASES = [
    (
        "missing checkpoint path",
        "step_99",
        "own",
        None,
        [],
        ["checkpoint.resume=", "step_99", "not a directory"],
    ),
    (
        "checkpoint path is a file",
        "step_2/trainer_state.json",
        "own",
        None,
        [],
        ["trainer_state.json", "not a directory"],
    ),
    (
        "resume path that is not a step dir",
        ".",
        "own",
        None,
        [],
        ["not a step_<N> checkpoint directory", "step_2, step_4"],
    ),
    ("resume from an incomplete save", "step_4", "copy-unmarked", None, [], ["has no COMPLETE marker"]),
    (
        "fresh start over saved checkpoints",
        None,
        "own",
        None,
        [],
        ["checkpoint.resume=None", "newest step_4"],
    ),
    (
        "resume older than the newest checkpoint",
        "step_2",
        "own",
        None,
        [],
        ["step_2", "is older than", "step_4"],
    ),
    (
        "checkpoint of another model shape",
        "latest",
        "own",
        None,
        ["model.moe.num_experts=8"],
        ["model.moe.num_experts=8 (checkpoint has 4)"],
    ),
    (
        "checkpoint of another width",
        "latest",
        "own",
        None,
        ["model.dim=64"],
        ["model.dim=64 (checkpoint has 32)"],
    ),
    ("corrupt trainer_state.json", "step_4", "copy", "state", [], ["step_4/trainer_state.json is corrupt"]),
    ("corrupt RNG file", "step_4", "copy", "rng", [], ["rng/rank_0.json is corrupt"]),
    ("missing config.yaml", "step_4", "copy", "config", [], ["step_4/config.yaml is missing or corrupt"]),
    ("missing .metadata", "step_4", "copy", "no_metadata", [], ["step_4/.metadata is missing"]),
    ("truncated shard file", "step_4", "copy", "truncated_shard", [], ["step_4/__0_0.distcp is truncated"]),
    (
        "garbage shard file",
        "step_4",
        "copy",
        "garbage_shard",
        [],
        ["could not read the tensors of checkpoint", "step_4"],
    ),
    (
        "hostile pickle in .metadata",
        "step_4",
        "copy",
        "hostile_metadata",
        [],
        [".metadata is corrupt", "refusing to load builtins.exec"],
    ),
]


@pytest.mark.timeout(120)
def test_checkpoint_mistakes_are_named_and_lose_nothing(saved_run, tmp_path):
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    saved = tree_digest(saved_run / "checkpoints")
    for i, (kind, resume, where, damage, overrides, expected) in enumerate(CHECKPOINT_CASES):
        out, root = saved_run, saved_run / "checkpoints"
        if where.startswith("copy"):  # damage a copy, in its own run directory
            out = tmp_path / f"case_{i}"
            shutil.copytree(saved_run / "checkpoints" / "step_4", out / "elsewhere" / "step_4")
            root = out / "elsewhere"
            if damage:
                _damage(root / "step_4", damage)
            else:
                (root / "step_4" / MARKER).unlink()
        before = tree_digest(root)
        target = {None: "null", "latest": "latest"}.get(resume, str(root / resume) if resume else None)
        start = time.perf_counter()
        with pytest.raises(ValueError) as info:
            build_trainer(make_job(out, f"checkpoint.resume={target}", *overrides), env)
        for fragment in expected:
            assert fragment in str(info.value), f"{kind}: {fragment!r} not in {info.value}"
        assert time.perf_counter() - start < 30, kind
        assert tree_digest(root) == before, f"{kind}: checkpoint files changed"
    assert tree_digest(saved_run / "checkpoints") == saved
    assert not (saved_run / "pwned").exists() and not list(tmp_path.rglob("pwned"))


# ---- 4. under torchrun at world 2, mistakes raised after the meshes exist: the job ends fast, nothing lost ----
@pytest.mark.integration
@pytest.mark.distributed
@pytest.mark.timeout(420)
def test_bad_inputs_fail_fast_on_every_rank_under_torchrun(tmp_path):
    # A checkpoint of the FAST job (one process is enough to write one).
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    run_dir = tmp_path / "run"
    fast = [o for o in FAST if not o.startswith("data=")]
    cfg = load(
        "data=synthetic",
        *fast,
        "parallel=single",
        f"output_dir={run_dir}",
        "train.stop_at_step=1",
        "checkpoint.interval=1",
    )
    build_trainer(cfg, env).fit()
    saved = tree_digest(run_dir / "checkpoints")
    assert (run_dir / "checkpoints" / "step_1" / MARKER).is_file()
    cases = [
        # raised in Checkpointer.load, after the meshes and FSDP exist
        (
            "checkpoint of another model shape",
            run_dir,
            ["checkpoint.resume=latest", "model.moe.num_experts=4"],
            "model.moe.num_experts=4 (checkpoint has 8)",
        ),
        # raised by the start-up check (automoe.train.build.check_layout), before the meshes exist
        (
            "global batch not divisible by micro x dp",
            tmp_path / "b",
            ["train.global_batch_size=6"],
            "global_batch_size=6 is not divisible by micro_batch_size=2 x dp_size=2",
        ),
    ]
    for kind, out, overrides, expected in cases:
        # "Fast" is "before a collective could hang": with the groups' timeout at 600 s, a rank left waiting in a
        # collective would outlive the 150 s this run is given (subprocess.TimeoutExpired). Not a wall-clock
        # bound on the refusal itself, which depends on the machine's load.
        run = torchrun(2, out, *overrides, "parallel.collective_timeout_s=600", timeout=150)
        assert run.returncode != 0, f"{kind}\n{tail(run)}"
        # Every rank raises it (same code, same inputs); torchrun may end the slower one before it prints.
        assert expected in run.output, f"{kind}\n{tail(run)}"
    assert tree_digest(run_dir / "checkpoints") == saved

"""Starting, resuming and refusing under torchrun (issue 12 §1 and §4): the command line wins on resume, a finished
run says so, init_from crosses layouts and data, a refused start leaves output_dir alone, settings must agree on
every rank, unknown `+keys` fail, and every refusal is printed once, by rank 0, after the config dump."""

from __future__ import annotations

import shutil

import pytest
import yaml

from automoe.train.metrics import WANDB_ID_FILE, read_metrics
from tests.integration.recipe import check_ok, run_plain_python, run_recipe

pytestmark = pytest.mark.integration

SAVE_AT_END = ("checkpoint.interval=6",)


@pytest.fixture(scope="module")
def finished_ep2(tmp_path_factory):
    """A finished 6-step EP=2 run (cosine, lr 3e-3) with its step_6 checkpoint and an offline wandb run."""
    root = tmp_path_factory.mktemp("finished") / "run"
    check_ok(run_recipe(2, root, *SAVE_AT_END, "logging.wandb.mode=offline"))
    return root


@pytest.mark.timeout(240)
def test_resume_of_finished_run_then_extension_with_new_schedule(finished_ep2, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_ep2, run_dir)
    wandb_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    # 1. resuming the finished run: nothing to train, exit 0, say so and how to extend it; no new wandb run
    done = check_ok(
        run_recipe(2, run_dir, *SAVE_AT_END, "logging.wandb.mode=offline", "checkpoint.resume=latest")
    )
    assert "the run is complete" in done.output and "train.steps=12 checkpoint.resume=latest" in done.output
    assert sorted((run_dir / "wandb").glob("offline-run-*")) == wandb_runs
    # 2. the command: more steps, another lr and schedule: the command line wins, the changes are logged
    more = check_ok(
        run_recipe(
            2,
            run_dir,
            "train.steps=8",
            "optim.lr=1e-3",
            "optim.schedule=constant",
            "checkpoint.resume=latest",
            "logging.wandb.mode=offline",
            "checkpoint.interval=8",
        )
    )
    for change in (
        "train.steps=8 (checkpoint: 6)",
        "optim.lr=0.001 (checkpoint: 0.003)",
        "optim.schedule='constant' (checkpoint: 'cosine')",
    ):
        assert change in more.output, more.output[-3000:]
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [r["lr"] for r in records[6:]] == [1e-3, 1e-3]
    for saved in (run_dir / "config.yaml", run_dir / "checkpoints" / "step_8" / "config.yaml"):
        cfg = yaml.safe_load(saved.read_text())
        assert cfg["optim"]["lr"] == 1e-3 and cfg["train"]["steps"] == 8
    # 3. the same wandb run (same id) continued
    run_id = (run_dir / WANDB_ID_FILE).read_text().strip()
    runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(f"-{run_id}") for name in runs), runs


@pytest.mark.timeout(240)
def test_init_from_on_another_layout_and_other_data(finished_ep2, tmp_path):
    """A resume on other data is refused and points at init_from; init_from (EP=2 checkpoint -> 1 process, other
    corpus, with the moments) trains steps 1.. of a new run, better at step 1 than a random init."""
    step6 = finished_ep2 / "checkpoints" / "step_6"
    other_data = ("data.synthetic_num_tokens=30000",)  # another corpus size: other num_samples
    resume = run_recipe(
        1, tmp_path / "resume", "parallel=single", f"checkpoint.resume={step6}", "train.steps=12", *other_data
    )
    assert resume.returncode != 0 and "checkpoint.init_from=" in resume.output, resume.output[-3000:]
    check_ok(
        run_recipe(
            1,
            tmp_path / "init",
            "parallel=single",
            f"checkpoint.init_from={step6}",
            "checkpoint.init_optimizer=true",
            *other_data,
            "train.first_loss_guard=false",
        )  # 6 steps in: not yet better than ln(V) - 1
    )
    fresh_first = read_metrics(finished_ep2 / "metrics.jsonl")[0]
    init = read_metrics(tmp_path / "init" / "metrics.jsonl")
    assert [r["step"] for r in init] == list(range(1, 7))
    assert init[0]["lr"] == fresh_first["lr"]  # the schedule starts over
    assert init[0]["loss"] < fresh_first["loss"] - 0.5  # trained weights, not a random init


@pytest.mark.timeout(120)
def test_refused_start_leaves_config_yaml_alone(finished_ep2, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_ep2, run_dir)
    before = (run_dir / "config.yaml").read_text()
    run = run_recipe(2, run_dir, "optim.lr=5e-4")  # a fresh start where checkpoints exist: refused
    assert run.returncode != 0 and "already holds complete checkpoints" in run.output
    assert (run_dir / "config.yaml").read_text() == before


@pytest.mark.timeout(120)
def test_output_dir_that_differs_between_ranks_fails_before_step_1(tmp_path):
    run = run_recipe(2, tmp_path, f"output_dir={tmp_path}/rank_${{oc.env:RANK}}")
    assert run.returncode != 0
    assert "output_dir differs between ranks" in run.output, run.output[-3000:]
    assert run.output.count("output_dir differs between ranks") == 1  # printed once, by rank 0
    assert not list(tmp_path.glob("rank_*/metrics.jsonl"))


@pytest.mark.timeout(120)
def test_refusal_printed_once_after_the_config_dump(tmp_path):
    run = run_recipe(2, tmp_path, "parallel.dp_shard=3")
    assert run.returncode != 0
    message = "does not match the world size 2"
    assert run.output.count(message) == 1, run.output[-3000:]
    assert run.output.index("resolved config:") < run.output.index(message)
    assert (
        "Error executing job" not in run.output and "automoe/train" not in run.output
    )  # no worker traceback
    assert not (tmp_path / "config.yaml").exists()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("override", ["+train.step=5", "++train.step=5"])
def test_plus_key_fails_naming_the_closest_key(tmp_path, override):
    run = run_recipe(2, tmp_path, override, timeout=100)
    assert run.returncode != 0
    assert "unknown config key 'train.step' (did you mean 'train.steps'?)" in run.output, run.output[-3000:]
    assert run.output.count("unknown config key") == 1  # rank 1 is ended before it repeats it
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.timeout(120)
def test_plain_python_says_to_use_torchrun_or_single(tmp_path):
    run = run_plain_python(tmp_path)
    assert run.returncode == 1
    assert "torchrun --nproc-per-node 2" in run.output and "parallel=single" in run.output, run.output[-2000:]
    check_ok(run_plain_python(tmp_path / "single", "parallel=single", "train.steps=2"))


@pytest.mark.timeout(120)
def test_warmup_not_shorter_than_the_run_warns(tmp_path):
    run = check_ok(run_recipe(1, tmp_path, "parallel=single", "train.steps=2", "optim.warmup_steps=2"))
    assert run.output.count("optim.warmup_steps=2 >= train.steps=2") == 1


@pytest.mark.timeout(120)
def test_resume_with_another_model_shape_is_refused_once(finished_ep2, tmp_path):
    """The tensor-shape check runs before anything is built (model on the meta device vs `.metadata`), so its
    refusal is printed once, by rank 0, like every other start-up check."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished_ep2, run_dir)
    run = run_recipe(2, run_dir, "model.moe.moe_inter_dim=64", "train.steps=8", "checkpoint.resume=latest")
    assert run.returncode != 0
    assert run.output.count("was written for another model shape") == 1, run.output[-3000:]
    assert "model.moe.moe_inter_dim=64 (checkpoint has 128)" in run.output

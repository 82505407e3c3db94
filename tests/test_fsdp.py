"""train.shard: fsdp on CPU (gloo): 2 sharded processes at batch 2 train exactly like 1 process at
batch 4, hold half of every weight each, and write checkpoints that a one-process run would."""

import json
from pathlib import Path

import pytest
import torch
from dist import assert_halved, assert_same_training, launch, load, ranks, run_worker
from dist_worker import run

HERE = Path(__file__).resolve().parent
SHARDED = {"shard": "fsdp", "steps": 4, "validation": True, "eval_every": 2}


@pytest.mark.slow
@pytest.mark.parametrize(
    "method,broken",
    [("full", False), ("lora", False), ("full", True)],
    ids=["full", "lora", "no-process-factor"],
)
def test_fsdp_two_processes_match_one(default_source, tmp_path, method, broken):
    """Losses, the first step's gradients (gathered from the shards) and the final weights
    (gathered back into the model) against one process, every element of every tensor; and
    each process held half of every parameter, the frozen base weights of LoRA too (whose runs
    also clip the gradient norm and recompute activations: gradient checkpointing). The
    negative control drops the process-count factor from the loss scale: FSDP averages the
    gradients over processes, so they come out halved and the test must see it."""
    out = tmp_path / "fsdp.json"
    options = {**SHARDED, "method": method, "broken": broken}
    run_worker(default_source.path, out, [{"out": str(out), **options}])
    two, one = load(out), run(default_source.path, 4, method=method, **SHARDED)
    assert one["fractions"] == {}  # 1 process: not sharded
    # sharded: every parameter, trainable or frozen, half on each process
    assert two["fractions"].keys() == two["params"].keys()
    assert set(two["fractions"].values()) == {0.5}
    if method == "lora":
        frozen = [k for k in two["params"] if "lora_" not in k]
        assert frozen and not set(frozen) & set(two["grads"])  # base weights: frozen, and sharded
    if broken:
        assert_halved(two, one)
        return
    assert_same_training(two, one)
    assert [s for s, _ in two["val_losses"]] == [s for s, _ in one["val_losses"]] == [2, 4]
    for (_, a), (_, b) in zip(two["val_losses"], one["val_losses"], strict=True):
        assert abs(a - b) <= 1e-4


@pytest.mark.slow
def test_fsdp_checkpoint_resume_is_exact(default_source, tmp_path):
    """Stopped after step 2 (as a signal stops it), a sharded run writes one checkpoint in the
    one-process format (full weights, numbered optimiser state), and resuming from it in 2
    sharded processes gives the losses and weights of the uninterrupted run."""
    from safetensors.torch import load_file

    out = tmp_path / "r.json"
    run_worker(default_source.path, out, [{"out": str(out), "resume_runs": True}])
    whole, cut, resumed = (load(f"{out}.{k}") for k in ("whole", "cut", "resumed"))
    assert cut["interrupted"] and cut["steps"] == 2 and len(whole["losses"]) == 4
    assert resumed["losses"] == whole["losses"]  # the first two restored, the last two trained
    a, b = whole["params"], resumed["params"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    (step,) = (Path(f"{out}.cut.run") / "checkpoints").glob("step-*")
    assert step.name == "step-2"

    # the same run in one process at batch 4, stopped at the same step: the same files
    one_dir = tmp_path / "one"
    run(default_source.path, 4, run_dir=str(one_dir), stop_at=2, **SHARDED)
    ref = one_dir / "checkpoints" / "step-2"
    # (best/: from the validation at step 2, the only one before the stop; copied aside by the
    # worker before the resumed run went on)
    pairs = [(step, ref), (Path(f"{out}.cut.best"), ref.parent / "best")]
    for sharded_dir, one_process_dir in pairs:
        ours = load_file(sharded_dir / "model.safetensors")
        theirs = load_file(one_process_dir / "model.safetensors")
        assert ours.keys() == theirs.keys() and len(ours) >= 8
        for key in theirs:
            assert torch.allclose(ours[key], theirs[key], rtol=0, atol=2e-5), key
    s2 = torch.load(step / "trainer_state.pt", weights_only=True)["optimizer"]
    s1 = torch.load(ref / "trainer_state.pt", weights_only=True)["optimizer"]
    assert s2["param_groups"] == s1["param_groups"]
    assert s2["state"].keys() == s1["state"].keys() and len(s1["state"]) >= 8
    for i, state in s1["state"].items():
        for key, value in state.items():
            assert torch.allclose(s2["state"][i][key], value, rtol=1e-3, atol=1e-7), (i, key)


def test_layer_classes_come_from_the_model_not_the_wrapper(tiny):
    """The unit FSDP shards by: the model's decoder layer, plain or inside peft."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from instill.config import AdapterConfig
    from instill.errors import InstillError
    from instill.models import attach_adapter
    from instill.train.shard import layer_classes

    assert layer_classes(tiny) == (LlamaDecoderLayer,)
    peft_model, _ = attach_adapter(tiny, AdapterConfig(method="lora"))
    assert layer_classes(peft_model) == (LlamaDecoderLayer,)
    with pytest.raises(InstillError, match="no decoder layers"):
        layer_classes(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_fsdp_refuses_what_it_cannot_do():
    from instill.config import TrainConfig
    from instill.errors import InstillError
    from instill.train.shard import check

    check(TrainConfig(shard="fsdp"), None)  # the supported combination
    with pytest.raises(InstillError, match="train.compile"):
        check(TrainConfig(shard="fsdp", compile=True), None)
    with pytest.raises(InstillError, match="eval.during_training"):
        check(TrainConfig(shard="fsdp"), lambda model: 0.0)


@pytest.mark.slow
def test_instill_train_fsdp_under_accelerate_launch(tiny_dir, tmp_path):
    """The CLI path, started with the shipped configs/accelerate/ddp.yaml (2 processes, which
    instill runs on the CPU here) and train.shard=fsdp: one run directory, written once,
    evaluated once, and a final/ adapter equal to that of the same run data parallel
    (train.shard=none), which is started with the other shipped config, multi_node.yaml, as two
    one-process "machines" on this host (machine_rank 0 and 1, rendezvous on 127.0.0.1)."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    def args(out, shard):
        return [
            "-m", "instill", "train", "quickstart", f"model.name={tiny_dir}",
            f"train.output_dir={out}", "train.max_steps=4", "train.batch_size=2",
            "train.log_every=1", "data.builtin.train_per_family=4",
            "data.builtin.eval_per_family=1", "data.builtin.families=[addition,uppercase]",
            "eval.holdout_clusters=[]", "eval.suites=[builtin]", "eval.max_new_tokens=4",
            f"train.shard={shard}",
        ]  # fmt: skip

    config = HERE.parent / "configs" / "accelerate" / "ddp.yaml"
    # (not --cpu: accelerate then starts one process; instill's Accelerator is on the CPU anyway)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               "--num_processes", "2", "--num_cpu_threads_per_process", "1"]  # fmt: skip
    proc = launch([*command, *args(tmp_path / "fsdp", "fsdp")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = proc.stdout + proc.stderr
    assert said.count("weights sharded over 2 processes") == 1  # sharded, said once
    assert said.count("total wall time") == 1
    run = tmp_path / "fsdp" / "quickstart"
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # one writer
    for name in ("base-builtin", "builtin"):  # evaluated before, and after on the full weights
        assert json.loads((run / "eval" / f"{name}.json").read_text())["n"] == 2

    import socket

    with socket.socket() as sock:  # a free port for the two machines' rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    config = HERE.parent / "configs" / "accelerate" / "multi_node.yaml"
    machines = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                "--config_file",
                str(config),
                "--num_processes",
                "2",
                "--machine_rank",
                str(rank),
                "--main_process_ip",
                "127.0.0.1",
                "--main_process_port",
                port,
                "--num_cpu_threads_per_process",
                "1",
                *args(tmp_path / "ddp", "none"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        for rank in (0, 1)
    ]
    outputs = [machine.communicate(timeout=600) for machine in machines]
    for machine, (_out, err) in zip(machines, outputs, strict=True):
        assert machine.returncode == 0, err[-3000:]
    said = "".join(out + err for out, err in outputs)
    assert "weights sharded" not in said
    assert said.count("total wall time") == 1  # one main process across both machines
    a = load_file(tmp_path / "ddp" / "quickstart" / "final" / "adapter_model.safetensors")
    b = load_file(run / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) >= 8
    for key in a:
        assert a[key].shape == b[key].shape, key
        assert torch.allclose(a[key], b[key], rtol=0, atol=2e-5), key


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_fsdp_kl_to_base_when_one_process_has_replay_rows(default_source, tmp_path, method):
    """train.kl_to_base with replay rows on rank 1 alone at step 1, on both at step 2, on rank 0
    alone at step 3, on neither at step 4: the processes run the same collectives every step
    (LoRA's base distribution comes from the same sharded layers with the adapters off, whose
    forward gathers weights from every process: without that, a hang), train exactly as one
    process does, and metrics.jsonl logs the KL over all processes' replay positions, the
    one-process value (full fine-tuning's frozen copy is not sharded: no hang, but the KL
    logged was the main process's alone)."""
    out = tmp_path / "kl.json"
    options = {"shard": "fsdp", "steps": 4, "method": method, "kl": 0.5}
    run_dir = str(tmp_path / "two")
    run_worker(default_source.path, out, [{"out": str(out), "per_device": 1, "run_dir": run_dir,
                                           **options}], timeout=300)  # fmt: skip
    two = load(out)
    one = run(default_source.path, 2, run_dir=str(tmp_path / "one"), **options)
    assert_same_training(two, one)
    # logged at steps 1 (from the base itself: about 0), 2 and 3; step 4 has no replay rows
    assert sorted(one["kl"]) == [1, 2, 3] and one["kl"][2] > 1e-5 and one["kl"][3] > 1e-5
    logged = {int(step): kl for step, kl in two["kl"].items()}  # (JSON's keys are strings)
    assert logged.keys() == one["kl"].keys()
    for step, value in one["kl"].items():
        assert abs(logged[step] - value) <= 2e-6, step


@pytest.mark.slow
def test_validation_decisions_are_the_same_on_every_process(default_source, tmp_path):
    """The validation loss behind checkpoints/best and early stopping is one global value: each
    process scores a share of the validation rows and the sums are reduced, so every process
    takes the same decisions even when what they were given differs (here: each its own
    validation rows; a process that alone stopped early, or alone gathered the weights for
    best/, would leave the others waiting in a collective). With the same rows, 2 processes
    pick the best step and stop at the step one process does."""
    differ, same = tmp_path / "differ.json", tmp_path / "same.json"
    options = {"shard": "fsdp", "steps": 8, "validation": True, "eval_every": 1, "patience": 2,
               "lr": 3e-2}  # fmt: skip
    runs = [{"out": str(differ), "rank_validation": True, **options}, {"out": str(same), **options}]
    run_worker(default_source.path, differ, runs, timeout=300)
    first, second = ranks(differ)
    assert first == second and len(first["val_losses"]) >= 3
    two = load(same)
    assert ranks(same)[0] == ranks(same)[1]
    one = run(default_source.path, 4, **options)
    assert one["stopped_early"] and one["steps"] < 8  # the run is one that stops early
    assert two["stopped_early"] and two["steps"] == one["steps"]
    assert two["best"][0] == one["best"][0]
    assert [s for s, _ in two["val_losses"]] == [s for s, _ in one["val_losses"]]
    for (_, a), (_, b) in zip(two["val_losses"], one["val_losses"], strict=True):
        assert abs(a - b) <= 1e-4

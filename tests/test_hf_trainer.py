"""AsyncTrainer in a real transformers Trainer: exact resume after SIGKILL, keep-best, paths."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from asyncckpt import list_checkpoints  # noqa: E402
from asyncckpt.errors import CheckpointNotFoundError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

COMMON = textwrap.dedent(
    """
    import os, signal, time
    import torch
    import transformers
    from asyncckpt import list_checkpoints
    from asyncckpt.integrations.transformers import AsyncTrainer

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    CFG = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16)

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            ids = torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids}

    class KillAfter(transformers.TrainerCallback):
        # SIGKILL this process once step `n` is committed, before the next step runs
        def __init__(self, root, n):
            self.root, self.n = root, n

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == self.n:
                while not any(c.step == self.n for c in list_checkpoints(self.root)):
                    time.sleep(0.01)
                os.kill(os.getpid(), signal.SIGKILL)

    def make(out, callbacks=(), eval_metrics=None, **kw):
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(CFG)
        base = dict(num_train_epochs=2, per_device_train_batch_size=4, save_steps=5, report_to=[],
                    logging_steps=1, use_cpu=True, disable_tqdm=True, seed=7, dataloader_num_workers=0)
        base.update(kw)
        args = transformers.TrainingArguments(output_dir=out, **base)
        extra = {}
        if eval_metrics is not None:
            # a scripted eval_loss per global step, so the best step is known
            class Scripted(AsyncTrainer):
                def evaluate(self, *a, **k):
                    m = {"eval_loss": eval_metrics[self.state.global_step]}
                    self.log(m)
                    return m
            cls = Scripted
            extra["eval_dataset"] = Data()
        else:
            cls = AsyncTrainer
        return cls(model=model, args=args, train_dataset=Data(), callbacks=list(callbacks), **extra)
    """
)

CHILD = COMMON + textwrap.dedent(
    """
    import sys
    out = sys.argv[1]
    make(out, [KillAfter(os.path.join(out, "asyncckpt"), 20)]).train()
    """
)

ns: dict = {}
exec(compile(COMMON, "hf_common", "exec"), ns)


def _snapshot(trainer) -> dict:
    out = {f"w.{k}": v.clone() for k, v in trainer.model.state_dict().items()}
    for pid, st in trainer.optimizer.state_dict()["state"].items():
        out.update({f"o.{pid}.{k}": torch.as_tensor(v).clone() for k, v in st.items()})
    out["sched"] = torch.tensor(trainer.lr_scheduler.state_dict()["last_epoch"])
    out["global_step"] = torch.tensor(trainer.state.global_step)
    out["epoch"] = torch.tensor(trainer.state.epoch)
    return out


def test_sigkill_mid_epoch_then_resume_from_checkpoint_is_bit_exact(tmp_path) -> None:
    ref = ns["make"](str(tmp_path / "ref"))
    ref.train()
    expected = _snapshot(ref)
    assert expected["global_step"].item() == 32

    out = str(tmp_path / "run")
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(script), out], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-3000:]
    root = os.path.join(out, "asyncckpt")
    assert [c.step for c in list_checkpoints(root)][-1] == 20  # epoch 1, batch 4 of 16

    t = ns["make"](out)
    t.train(resume_from_checkpoint=root)  # HF's own resume path, pointed at the root
    got = _snapshot(t)
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    assert [c.step for c in list_checkpoints(root)][-3:] == [25, 30, 32]
    # the log history of the first run came back through the TrainerState
    assert [e["step"] for e in t.state.log_history if "loss" in e][:3] == [1, 2, 3]


def test_save_total_limit_and_best_keep_each_steps_own_metric(tmp_path) -> None:
    # eval every 4 steps; eval_loss by step: the best is step 8 (1.0)
    seq = {4: 5.0, 8: 1.0, 12: 3.0, 16: 2.0, 20: 4.0, 24: 6.0, 28: 7.0, 32: 8.0}
    t = ns["make"](str(tmp_path / "o"), eval_metrics=seq, eval_strategy="steps", eval_steps=4, save_steps=4,
                   save_total_limit=2, load_best_model_at_end=True, metric_for_best_model="loss")  # fmt: skip
    t.train()
    root = t.asyncckpt_root
    infos = list_checkpoints(root)
    assert [c.step for c in infos] == [8, 32]  # HF's rule: the newest and the best
    assert infos[0].metrics["eval_loss"] == 1.0 and infos[1].metrics["eval_loss"] == 8.0
    assert t.state.best_global_step == 8
    assert t.state.best_model_checkpoint.endswith("step_000000008")


def test_hf_style_path_fails_naming_the_root(tmp_path) -> None:
    t = ns["make"](str(tmp_path / "o"), max_steps=5)
    t.train()
    with pytest.raises(CheckpointNotFoundError, match=r"asyncckpt.*step_000000005"):
        t.train(resume_from_checkpoint=str(tmp_path / "o" / "checkpoint-5"))


def test_resume_true_picks_the_newest_step_and_step_dirs_work(tmp_path) -> None:
    t = ns["make"](str(tmp_path / "o"), max_steps=10)
    t.train()
    root = t.asyncckpt_root
    assert [c.step for c in list_checkpoints(root)] == [5, 10]
    t2 = ns["make"](str(tmp_path / "o"), max_steps=12)
    t2.train(resume_from_checkpoint=True)
    assert t2.state.global_step == 12
    t3 = ns["make"](str(tmp_path / "o2"), max_steps=7)
    t3.train(resume_from_checkpoint=list_checkpoints(root)[0].path)  # one step dir: step 5
    assert t3.state.global_step == 7

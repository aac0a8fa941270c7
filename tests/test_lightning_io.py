"""AsyncCheckpointIO in a real Lightning Trainer: exact resume after SIGKILL, keep-best, errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pl = pytest.importorskip("pytorch_lightning")

from asyncckpt import list_checkpoints  # noqa: E402
from asyncckpt.errors import AsyncCheckpointError, UnsupportedStateError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# The model, data and trainer, shared by the test process and the child it kills.
COMMON = textwrap.dedent(
    """
    import os, signal, time
    import torch
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from asyncckpt import list_checkpoints
    from asyncckpt.integrations.lightning import AsyncCheckpointIO

    torch.set_num_threads(1)

    class Loader(torch.utils.data.DataLoader):
        # a resumable loader: Lightning saves its state in the loops, and restores it
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.yielded, self.skip = 0, 0

        def __iter__(self):
            skip, self.skip = self.skip, 0
            self.yielded = skip
            for i, batch in enumerate(super().__iter__()):
                if i >= skip:
                    self.yielded += 1
                    yield batch

        def state_dict(self):
            return {"yielded": self.yielded}

        def load_state_dict(self, sd):
            self.skip = sd["yielded"]

    class Net(pl.LightningModule):
        def __init__(self, val=None):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
            self.val = val

        def training_step(self, batch, idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def validation_step(self, batch, idx):
            # a scripted val_loss per global step, so the best step is known
            self.log("val_loss", torch.tensor(float(self.val[self.global_step])))

        def configure_optimizers(self):
            opt = torch.optim.Adam(self.parameters(), lr=0.01)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 7, 0.5)}

    def data():
        g = torch.Generator().manual_seed(1)
        ds = torch.utils.data.TensorDataset(torch.randn(96, 8, generator=g), torch.randn(96, 1, generator=g))
        return Loader(ds, batch_size=8)

    def trainer(root, callbacks, **kw):
        return pl.Trainer(plugins=[AsyncCheckpointIO(root)], callbacks=callbacks, logger=False,
                          enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                          num_sanity_val_steps=0, **kw)

    class KillAfter(pl.Callback):
        # SIGKILL this process once step `n` is committed, before the next step runs
        def __init__(self, root, n):
            self.root, self.n = root, n

        def on_train_batch_start(self, trainer, module, batch, idx):
            if trainer.global_step == self.n:
                while not any(c.step == self.n for c in list_checkpoints(self.root)):
                    time.sleep(0.01)
                os.kill(os.getpid(), signal.SIGKILL)
    """
)

CHILD = COMMON + textwrap.dedent(
    """
    import sys
    root, ckdir = sys.argv[1], sys.argv[2]
    mc = ModelCheckpoint(dirpath=ckdir, every_n_train_steps=5, save_top_k=-1, save_last=True)
    trainer(root, [mc, KillAfter(root, 15)], max_epochs=3, limit_val_batches=0).fit(Net(), data())
    """
)

ns: dict = {}
exec(compile(COMMON, "lightning_common", "exec"), ns)


def _snapshot(trainer, model) -> dict:
    out = {f"w.{k}": v.clone() for k, v in model.state_dict().items()}
    for i, opt in enumerate(trainer.optimizers):
        for pid, st in opt.state_dict()["state"].items():
            out.update({f"o{i}.{pid}.{k}": torch.as_tensor(v).clone() for k, v in st.items()})
    out["sched"] = torch.tensor(trainer.lr_scheduler_configs[0].scheduler.last_epoch)
    out["global_step"] = torch.tensor(trainer.global_step)
    out["epoch"] = torch.tensor(trainer.current_epoch)
    return out


def test_sigkill_mid_epoch_then_fit_ckpt_path_is_bit_exact(tmp_path) -> None:
    ModelCheckpoint = ns["ModelCheckpoint"]
    # uninterrupted
    ref_model = ns["Net"]()
    ref = ns["trainer"](str(tmp_path / "ref"), [ModelCheckpoint(dirpath=str(tmp_path / "refck"), every_n_train_steps=5)],
                        max_epochs=3, limit_val_batches=0)  # fmt: skip
    ref.fit(ref_model, ns["data"]())
    expected = _snapshot(ref, ref_model)
    assert expected["global_step"].item() == 36 and ref.current_epoch == 3

    # killed at step 15 (epoch 1, batch 3 of 12) right after that step committed
    root, ckdir = str(tmp_path / "root"), str(tmp_path / "ck")
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(script), root, ckdir], env=env, capture_output=True, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-3000:]
    assert [c.step for c in list_checkpoints(root)][-1] == 15
    assert (Path(ckdir) / "last.ckpt").exists()

    # resumed through Lightning's own path: fit(ckpt_path=...)
    model = ns["Net"]()
    mc = ModelCheckpoint(dirpath=ckdir, every_n_train_steps=5, save_top_k=-1, save_last=True)
    t = ns["trainer"](root, [mc], max_epochs=3, limit_val_batches=0)
    t.fit(model, ns["data"](), ckpt_path=str(Path(ckdir) / "last.ckpt"))
    got = _snapshot(t, model)
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    assert [c.step for c in list_checkpoints(root)] == [5, 10, 15, 20, 25, 30, 35]


def _val_run(tmp_path, **mc_kw):
    val = {s: v for s, v in zip(range(3, 19, 3), [5.0, 3.0, 4.0, 1.0, 2.0, 6.0])}
    root, ckdir = str(tmp_path / "root"), str(tmp_path / "ck")
    mc = ns["ModelCheckpoint"](dirpath=ckdir, monitor="val_loss", mode="min", **mc_kw)
    t = ns["trainer"](root, [mc], max_steps=18, val_check_interval=3, limit_val_batches=1)
    t.fit(ns["Net"](val), ns["data"](), ns["data"]())
    return root, mc


def test_model_checkpoint_top_k_keeps_the_true_best(tmp_path) -> None:
    root, mc = _val_run(tmp_path, save_top_k=2)
    infos = list_checkpoints(root)
    # top-2 of 5,3,4,1,2,6 at steps 3..18: steps 12 (1.0) and 15 (2.0); 3, 6, 9 were deleted
    assert [c.step for c in infos] == [12, 15]
    assert [c.metrics["val_loss"] for c in infos] == [1.0, 2.0]  # each step's own score
    assert sorted(os.listdir(tmp_path / "ck")) == ["epoch=0-step=12.ckpt", "epoch=1-step=15.ckpt"]
    best = mc.best_model_path
    assert best.endswith("step=12.ckpt")
    loaded = ns["AsyncCheckpointIO"](root).load_checkpoint(best)
    assert loaded["global_step"] == 12
    assert isinstance(loaded["optimizer_states"][0]["state"][0]["exp_avg"], torch.Tensor)


def test_deprecated_callback_attaches_each_steps_own_metric(tmp_path) -> None:
    from asyncckpt.integrations.lightning import AsyncCheckpointCallback
    from asyncckpt.policy import KeepBest

    val = {s: v for s, v in zip(range(3, 19, 3), [5.0, 3.0, 4.0, 1.0, 2.0, 6.0])}
    root = str(tmp_path / "cb")
    with pytest.warns(DeprecationWarning):
        cb = AsyncCheckpointCallback(root, schedule=3, keep=KeepBest(1, "val_loss"))
    t = pl.Trainer(callbacks=[cb], enable_checkpointing=False, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0, max_steps=18,
                   val_check_interval=3, limit_val_batches=1)  # fmt: skip
    t.fit(ns["Net"](val), ns["data"](), ns["data"]())
    infos = list_checkpoints(root)
    assert [c.step for c in infos] == [12, 18]  # the best, and the newest (never deleted)
    assert infos[0].metrics["val_loss"] == 1.0 and infos[1].metrics["val_loss"] == 6.0


def test_unstorable_hyperparameter_names_its_key(tmp_path) -> None:
    class Odd:
        pass

    class WithOdd(ns["Net"]):
        def on_save_checkpoint(self, checkpoint):
            checkpoint["extra"] = {"thing": Odd()}

    t = ns["trainer"](str(tmp_path / "root"), [ns["ModelCheckpoint"](dirpath=str(tmp_path / "ck"))],
                      max_steps=2, limit_val_batches=0)  # fmt: skip
    with pytest.raises(UnsupportedStateError, match=r"\['extra'\]\['thing'\].*Odd") as e:
        t.fit(WithOdd(), ns["data"]())
    assert isinstance(e.value, AsyncCheckpointError)


def test_load_rejects_a_torch_save_file(tmp_path) -> None:
    p = tmp_path / "x.ckpt"
    torch.save({"a": 1}, p)
    with pytest.raises(AsyncCheckpointError, match="not an asyncckpt checkpoint pointer"):
        ns["AsyncCheckpointIO"](str(tmp_path / "root")).load_checkpoint(str(p))

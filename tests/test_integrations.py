"""The framework adapters, run with the real frameworks (skipped where not installed)."""

from __future__ import annotations

import pytest
import torch

from asyncckpt import list_checkpoints

from .helpers import assert_same, snapshot


def test_lightning_callback_saves_and_resumes(tmp_path) -> None:
    pl = pytest.importorskip("pytorch_lightning")
    from asyncckpt.integrations.lightning import AsyncCheckpointCallback

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(4, 1)

        def training_step(self, batch, idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            opt = torch.optim.Adam(self.parameters(), lr=0.01)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 5)}

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    root = str(tmp_path / "ckpt")

    def trainer(steps: int, cb):
        return pl.Trainer(max_steps=steps, callbacks=[cb], enable_checkpointing=False, logger=False,
                          enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")  # fmt: skip

    model = Tiny()
    with pytest.warns(DeprecationWarning, match="AsyncCheckpointIO"):
        cb = AsyncCheckpointCallback(root, save_policy=4, keep=2)
    trainer(10, cb).fit(model, loader)
    assert [c.step for c in list_checkpoints(root)] == [8, 10]  # every 4, keep 2, final step 10
    assert "train_loss" in list_checkpoints(root)[-1].metrics
    trained = snapshot(model)

    fresh = Tiny()
    with pytest.warns(DeprecationWarning):
        cb2 = AsyncCheckpointCallback(root, save_policy=4, keep=2)
    t2 = trainer(12, cb2)
    t2.fit(fresh, loader)
    assert cb2.resumed_step == 10
    assert t2.global_step == 12  # continued from 10, not from 0
    assert [c.step for c in list_checkpoints(root)][-1] == 12
    assert not torch.equal(snapshot(fresh)[".net.weight"], torch.zeros(1))
    assert trained.keys() == snapshot(fresh).keys()


def test_transformers_callback_saves_and_resumes(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from asyncckpt.integrations.transformers import AsyncCheckpointCallback

    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16)

    class Data(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 64

        def __getitem__(self, i: int):
            g = torch.Generator().manual_seed(i)
            ids = torch.randint(0, 64, (16,), generator=g)
            return {"input_ids": ids, "labels": ids}

    root = str(tmp_path / "ckpt")

    def run(max_steps: int):
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(cfg)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / "hf"), max_steps=max_steps, per_device_train_batch_size=4,
            save_strategy="no", report_to=[], logging_strategy="no", use_cpu=True, disable_tqdm=True,
        )  # fmt: skip
        cb = AsyncCheckpointCallback(root, save_policy=3, keep=2)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=Data(), callbacks=[cb])
        trainer.train()
        return model, cb, trainer

    model, _, _ = run(7)
    assert [c.step for c in list_checkpoints(root)] == [6, 7]
    before = snapshot(model)
    model2, cb2, trainer2 = run(7)  # resumes at 7: nothing left to train
    assert cb2.resumed_step == 7
    assert_same(snapshot(model2), before)


def test_export_loads_in_transformers_from_pretrained(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    from asyncckpt import AsyncCheckpointer
    from asyncckpt.cli import main as cli

    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    root = str(tmp_path / "ckpt")
    with AsyncCheckpointer(root, {"model": model, "extra": {"step": 1}}) as ck:
        ck.save_async(1).result()
    out = str(tmp_path / "hf")
    assert cli(["export", root, out, "--only", "model.", "--max-shard-size", "20KB"]) == 0
    cfg.save_pretrained(out)  # an HF model directory: config + sharded safetensors + index
    loaded = transformers.GPT2LMHeadModel.from_pretrained(out)
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_transformers_callback_keeps_the_step_whose_own_metric_is_best(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from asyncckpt.integrations.transformers import AsyncCheckpointCallback
    from asyncckpt.policy import KeepBest

    seq = {2: 3.0, 4: 1.0, 6: 2.0, 8: 4.0}  # eval_loss by step: the best is step 4

    class Scripted(transformers.Trainer):
        def evaluate(self, *a, **k):
            m = {"eval_loss": seq[self.state.global_step]}
            self.log(m)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, m)
            return m

    class Data(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 32

        def __getitem__(self, i: int):
            ids = torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids}

    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    root = str(tmp_path / "ckpt")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), max_steps=8, per_device_train_batch_size=4, save_strategy="no",
        eval_strategy="steps", eval_steps=2, report_to=[], use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    cb = AsyncCheckpointCallback(root, schedule=2, keep=KeepBest(1, "eval_loss"))
    trainer = Scripted(model=transformers.GPT2LMHeadModel(cfg), args=args, train_dataset=Data(),
                       eval_dataset=Data(), callbacks=[cb])  # fmt: skip
    trainer.train()
    infos = list_checkpoints(root)
    assert [c.step for c in infos] == [4, 8]  # the best, and the newest (never deleted)
    assert infos[0].metrics["eval_loss"] == 1.0 and infos[1].metrics["eval_loss"] == 4.0

"""Stall per save inside real trainers: asyncckpt vs the framework's own saving, same run.

The *stall* is the wall time of the call through which the trainer saves, measured inside
the trainer's own training loop:

- Hugging Face: ``Trainer._save_checkpoint`` (HF: ``save_strategy="steps"``, safetensors weights,
  ``torch.save`` of optimizer, scheduler and RNG, ``trainer_state.json``; asyncckpt:
  ``AsyncTrainer``, which snapshots into a host buffer and writes in the background).
- Lightning: ``ModelCheckpoint._save_checkpoint`` (default ``TorchCheckpointIO``, ``torch.save``;
  asyncckpt: ``Trainer(plugins=[AsyncCheckpointIO(root)])``).  Both include Lightning's own
  ``dump_checkpoint`` (collecting the state dicts), which is the same for both.

Each framework trains the same model on the same data twice, once per saver, with a save every
``--every`` steps; the first save of each run is reported apart (asyncckpt allocates its host
buffer there) and the median of the others is compared.  Background writes are drained at the
end of training and are not counted.  Steps are also timed, so the stall can be put against
the step time.

Usage: ``python -m benchmarks.bench_trainers [--layers 4] [--width 256] [--steps 24]
[--every 4] [--dir PARENT] [--json benchmarks/results/trainers_cpu.json] [--only hf,lightning]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch


def _timed(fn: Callable[..., Any], into: list[float]) -> Callable[..., Any]:
    def wrapper(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            into.append(time.perf_counter() - t0)

    return wrapper


def _summary(stalls: list[float], wall: float, steps: int) -> dict[str, Any]:
    rest = stalls[1:] or stalls
    return {
        "saves": len(stalls),
        "first_s": stalls[0] if stalls else None,
        "median_s": statistics.median(rest) if rest else None,
        "total_stall_s": sum(stalls),
        "train_wall_s": wall,
        "step_s": (wall - sum(stalls)) / steps,
    }


def run_hf(out: str, layers: int, width: int, steps: int, every: int, use_async: bool) -> dict[str, Any]:
    import transformers

    from asyncckpt.integrations.transformers import AsyncTrainer

    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(n_layer=layers, n_embd=width, n_head=4, vocab_size=8192, n_positions=64)

    class Data(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4096

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            ids = torch.randint(0, 8192, (64,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids}

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    args = transformers.TrainingArguments(
        output_dir=out, max_steps=steps, per_device_train_batch_size=4, save_strategy="steps",
        save_steps=every, save_total_limit=2, report_to=[], logging_strategy="no", use_cpu=True,
        disable_tqdm=True,
    )  # fmt: skip
    cls = AsyncTrainer if use_async else transformers.Trainer
    trainer = cls(model=model, args=args, train_dataset=Data())
    stalls: list[float] = []
    trainer._save_checkpoint = _timed(trainer._save_checkpoint, stalls)  # type: ignore[method-assign]
    t0 = time.perf_counter()
    trainer.train()  # AsyncTrainer drains its writes here: counted in wall, not in the stall
    res = _summary(stalls, time.perf_counter() - t0, steps)
    res["params"] = sum(p.numel() for p in model.parameters())
    return res


def run_lightning(
    root: str, layers: int, width: int, steps: int, every: int, use_async: bool
) -> dict[str, Any]:
    try:
        import lightning.pytorch as pl
        from lightning.pytorch.callbacks import ModelCheckpoint
    except ImportError:
        import pytorch_lightning as pl  # type: ignore[no-redef]
        from pytorch_lightning.callbacks import ModelCheckpoint  # type: ignore[no-redef]

    from asyncckpt.integrations.lightning import AsyncCheckpointIO

    class MLP(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            dims = [width * 4] * (layers + 1)
            self.net = torch.nn.Sequential(*[torch.nn.Linear(a, b) for a, b in zip(dims, dims[1:])])

        def training_step(self, batch: Any, idx: int) -> torch.Tensor:
            (x,) = batch
            return self.net(x).pow(2).mean()

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(steps * 16, width * 4, generator=g)),
                                       batch_size=16)  # fmt: skip
    mc = ModelCheckpoint(dirpath=os.path.join(root, "lightning"), every_n_train_steps=every, save_top_k=2,
                         monitor="step", mode="max")  # fmt: skip
    stalls: list[float] = []
    mc._save_checkpoint = _timed(mc._save_checkpoint, stalls)  # type: ignore[method-assign]
    plugins = [AsyncCheckpointIO(os.path.join(root, "asyncckpt"))] if use_async else []
    model = MLP()
    trainer = pl.Trainer(max_steps=steps, callbacks=[mc], plugins=plugins, logger=False, accelerator="cpu",
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    t0 = time.perf_counter()
    trainer.fit(model, data)
    res = _summary(stalls, time.perf_counter() - t0, steps)
    res["params"] = sum(p.numel() for p in model.parameters())
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--every", type=int, default=4)
    p.add_argument("--only", default="hf,lightning")
    p.add_argument("--dir", default=None, help="parent directory for the checkpoints (default: a temp dir)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    args = p.parse_args(argv)
    result: dict[str, Any] = {
        "config": vars(args),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for fw in args.only.split(","):
            run = {"hf": run_hf, "lightning": run_lightning}[fw]
            per = {}
            for name, use_async in (("default", False), ("asyncckpt", True)):
                per[name] = run(os.path.join(tmp, f"{fw}-{name}"), args.layers, args.width, args.steps,
                                args.every, use_async)  # fmt: skip
            d, a = per["default"], per["asyncckpt"]
            per["ratio_median"] = d["median_s"] / a["median_s"] if a["median_s"] else None
            per["ratio_total"] = d["total_stall_s"] / a["total_stall_s"] if a["total_stall_s"] else None
            result[fw] = per
            print(
                f"{fw:9s} params={a['params'] / 1e6:.1f}M saves={a['saves']}  "
                f"default: median {d['median_s'] * 1e3:.1f} ms (first {d['first_s'] * 1e3:.1f})  "
                f"asyncckpt: median {a['median_s'] * 1e3:.1f} ms (first {a['first_s'] * 1e3:.1f})  "
                f"-> {per['ratio_median']:.1f}x less stall per save, {per['ratio_total']:.1f}x in total; "
                f"step {d['step_s'] * 1e3:.0f} ms"
            )
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

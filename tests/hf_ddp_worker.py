"""One rank of tests/test_integrations_hf.py's DDP test: FSAMTrainer on a tiny BERT over
gloo (the launcher sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Saves the
micro-batches it trained on and its weights after every step to OUT/rank{RANK}.pt."""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import test_integrations_hf as T  # noqa: E402


def main(out):
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts them)
    model = T.bert()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer, snaps = T.make_trainer(
        model, T.text_data(64, "bert", 7), os.path.join(out, "trainer"), ddp_backend="gloo",
        per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3,
        ddp_timeout=120,
    )  # fmt: skip
    trainer.train()
    rank = int(os.environ["RANK"])
    torch.save(
        {
            "init": init,
            "cycles": trainer.cycles,
            "params": snaps.params,
            "world": trainer.args.world_size,
            "ddp": type(trainer.model_wrapped).__name__,
        },
        os.path.join(out, f"rank{rank}.pt"),
    )


if __name__ == "__main__":
    main(sys.argv[1])

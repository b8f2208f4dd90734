"""fourbit.train: QLoRA fine-tuning.

    from fourbit.train import TrainConfig, train
    summary = train(TrainConfig(steps=12, output_dir="runs/dates"))   # embedded model + task
    summary["exact_match_before"], summary["exact_match_after"]

`config` (TrainConfig), `loop` (Trainer, train, lr_at), `data` (JSONL -> masked, padded batches),
`task` (the embedded date task and the exact-match evaluator), `models` (load + quantize on load),
`checkpoint` (one format for every mode; atomic, resumable), `rundir` (the run directory: lock,
marker, replacing an old run), `lock`, `export` (`fourbit quantize`), `plot`, `optim` (paged AdamW),
`distributed` (the Runtime: where this process runs), `parallel` (DDP/FSDP2 wrapping).
"""

from .config import TrainConfig
from .loop import Trainer, lr_at, train

__all__ = ["TrainConfig", "Trainer", "lr_at", "train"]

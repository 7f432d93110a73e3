"""Run under ``accelerate launch``: train the tiny preset a few steps, then every rank writes what it trained.

Usage: distributed_run.py HR_DIR OUTPUT_DIR STEPS
"""

import sys
from pathlib import Path

from safetensors.torch import save_file

from training.config import load_config
from training.methods import METHODS
from training.trainer import Trainer

hr_dir, output_dir, steps = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
config = load_config(
    preset="tiny",
    overrides=[f"data.hr_dir={hr_dir}", f"train.max_steps={steps}", "train.batch_size=1", "d3sr.discriminator.t_max=500"],
    method_defaults=METHODS["d3sr"].defaults,
    other_sections=tuple(METHODS),
)
trainer = Trainer(config, output_dir)
trainer.train()
rank = trainer.accelerator.process_index
save_file(trainer.method.trainable_state_dict(), str(output_dir / f"rank{rank}.safetensors"))
print(f"rank {rank} of {trainer.accelerator.num_processes} done")

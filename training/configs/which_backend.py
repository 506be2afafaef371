"""Print what an accelerate config really gives on this machine: the distributed type and the prepared model's class.

    ACCELERATE_USE_CPU=1 accelerate launch --config_file training/configs/fsdp.yaml --num_processes 2 \\
        training/configs/which_backend.py
"""

import torch
from accelerate import Accelerator

accelerator = Accelerator()
model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters()))
accelerator.print(accelerator.distributed_type, accelerator.device, type(model).__name__, type(next(model.parameters())).__name__)

"""FSDP2 on CPU processes, through the same accelerate/Trainer path as on GPUs.

    accelerate launch --config_file train/accelerate/fsdp.yaml --num_processes 2 train/pretrain.py [arguments]

runs on a machine without GPUs too: each process holds 1/N of every parameter, gradient and optimizer state as a
sharded `DTensor`, and the processes talk over gloo.

Why hfgpt has to step in: accelerate (1.x) chooses FSDP only for accelerator devices. `AcceleratorState` turns an
FSDP config into `DistributedType.FSDP` for MULTI_GPU/XPU/NPU/... and leaves CPU processes as MULTI_CPU, i.e. plain
DDP, whatever the config says; no option changes that. PyTorch does not need the GPU: `fully_shard` shards over a gloo
process group on CPU tensors, and accelerate's FSDP2 code (wrapping each `HFGPTBlock`, sharded checkpoints through
torch.distributed.checkpoint, gathering the full state dict) has nothing device-specific in it. So
`ShardingMixin` sets the accelerator state to FSDP where accelerate left it at MULTI_CPU, and from then on the
CPU run takes exactly the code path a GPU run takes. FSDP1 (`fsdp_version: 1`, the legacy API) is not promoted:
accelerate cannot even build its plugin on CPU processes with `cpu_ram_efficient_loading`, and without it trains them
as plain data parallel, which `warn_if_sharding_is_ignored` reports.

`ShardingMixin` also saves a sharded model under its own class: `fully_shard` gives the model a new class
(`FSDPHFGPTForCausalLM`, defined inside torch), which `save_pretrained` would otherwise write into config.json's
auto_map, copying torch's FSDP sources next to the model; and the gathered state dict holds the tied output layer a
second time. Both happen on GPUs as well.
"""

from __future__ import annotations

import os

from torch import nn

from .common import tied_parameter_names


def fsdp_requested(args) -> bool:
    """An FSDP config reached this process: `accelerate launch --config_file ...fsdp.yaml` (environment) or
    TrainingArguments' `--fsdp` / `--fsdp_config`."""
    return (os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
            or getattr(args, "fsdp_plugin_args", None) is not None)


def promote_cpu_processes_to_fsdp(accelerator, args) -> bool:
    """Where accelerate left an FSDP2 request on CPU processes as MULTI_CPU (plain DDP), make the accelerator state
    FSDP with the plugin built from the same settings accelerate would have used. Returns True if it did."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU or not fsdp_requested(args):
        return False
    plugin_args = getattr(args, "fsdp_plugin_args", None) or {}
    # accelerate's rule for the version: the plugin's argument, else FSDP_VERSION, else 1. FSDP1's plugin cannot even
    # be built on CPU processes (its sync_module_states), so the version is read first.
    version = plugin_args.get("fsdp_version") or os.environ.get("FSDP_VERSION", "1")
    if int(version) != 2:
        return False
    plugin = FullyShardedDataParallelPlugin(**plugin_args)
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)  # what AcceleratorState does for GPUs
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # the two states agree, as on GPUs
    return True


def is_sharded(model: nn.Module) -> bool:
    """Whether `fully_shard` (FSDP2) has wrapped `model`: its forward then gathers the weights from every process."""
    import torch.distributed

    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def unsharded_class(model: nn.Module) -> type:
    """The model's own class under the one `fully_shard` gave it (`FSDPHFGPTForCausalLM` -> `HFGPTForCausalLM`)."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(model)
    if not issubclass(cls, FSDPModule):
        return cls
    return next(base for base in cls.__bases__ if not issubclass(base, FSDPModule))


def reshard(model: nn.Module) -> None:
    """Free the full weights that units of a sharded model keep gathered after a forward pass: FSDP2 leaves the root
    unsharded, and accelerate the unit of the output layer, for the backward that follows in training; after
    inference none follows."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


class ShardingMixin:
    """Put before a Trainer class (`class T(SpeedMixin, ShardingMixin, ..., Trainer)`): FSDP2 runs on CPU processes
    as on GPUs (see the module docstring); on either, a sharded model saves like an unsharded one, its checkpoints
    hold the config and tokenizer, and an adapter (LoRA), which hfgpt cannot save sharded yet, is refused."""

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if promote_cpu_processes_to_fsdp(self.accelerator, self.args):
            self.is_fsdp_enabled = True
        if self.is_fsdp_enabled and getattr(self.model, "peft_config", None):
            # tried on 2 CPU processes: training runs, then hfgpt's adapter saving (PEFT's save_pretrained on the
            # sharded DTensors) fails; refused before the training it would waste
            raise ValueError("--lora / --qlora with FSDP: hfgpt cannot save the adapter of a sharded model yet. "
                             "Train the adapter with train/accelerate/ddp.yaml (its trainable weights are small), "
                             "or fine-tune all weights under FSDP (no --lora).")

    def save_model(self, output_dir=None, _internal_call=False):
        super().save_model(output_dir, _internal_call)
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        if (self.is_fsdp_enabled and plugin is not None and "FULL_STATE_DICT" not in str(plugin.state_dict_type)
                and self.args.should_save):
            # Trainer writes a sharded checkpoint's weights as per-rank files and nothing else; the config and the
            # tokenizer, which every other checkpoint holds, let a resumed run check and reuse them
            output_dir = output_dir or self.args.output_dir
            self.accelerator.unwrap_model(self.model).config.save_pretrained(output_dir)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)

    def _save(self, output_dir=None, state_dict=None):
        model = self.model
        sharded_class = type(model)
        own_class = unsharded_class(model)
        if own_class is sharded_class:
            return super()._save(output_dir, state_dict=state_dict)
        if state_dict is not None:  # the gathered weights: the tied output layer is the input embedding, stored once
            tied = tied_parameter_names(model)
            state_dict = {name: tensor for name, tensor in state_dict.items() if name not in tied}
        model.__class__ = own_class  # only while saving: config.json's auto_map names hfgpt's class, not torch's
        try:
            return super()._save(output_dir, state_dict=state_dict)
        finally:
            model.__class__ = sharded_class


__all__ = ["ShardingMixin", "fsdp_requested", "promote_cpu_processes_to_fsdp", "reshard", "unsharded_class"]

"""A recipe's parallelism on a built TurboS model: expert parallelism, context parallelism, then
FSDP2 (``fully_shard`` on every layer, then on the root).

Expert parallelism (``turbos.distributed.expert_parallel``) makes the routed experts DTensors
sharded over an ``ep`` mesh dimension; FSDP2 then shards them again, over the ranks holding the
same experts (the ``ep_replica`` dimension of one ``(world / ep, ep)`` mesh: 2-D DTensors), in
their own FSDP unit, while the rest of the layer is sharded over all ranks. Context parallelism
(``turbos.distributed.context_parallel``) puts its hooks on the model; the training loss then
runs on each rank's shard of the sequence.

Gradients: FSDP2 averages over the ranks it reduces over. Every rank's loss is its share (its
batch, its sequence shard), so the step's gradient is the mean over all ranks of their
gradients. A local expert's gradient already sums the contributions of its EP group (the
exchange's backward), so its FSDP unit divides the sum over its replicas by the world size too.

Each ``TurboSLayer`` is one FSDP unit (its parameters gathered for its forward and backward,
resharded after), and the root holds the rest: embeddings, final norm and LM head, so tied
embeddings stay one parameter. Activation checkpointing is the composable
``torch.distributed._composable.checkpoint`` on each layer, which leaves the module tree and the
state-dict keys unchanged (MoE layers overwrite their router entry when recomputed, see
``LayerContext``). Pre-training builds the model on the meta device and shards it there; each
rank then allocates its shards only and fills them with the draws of a single process
(``materialize``: every module's parameters drawn whole in turn, under the same seed), so the
weights are bitwise those of one process. A model built on a real device (a loaded checkpoint,
SFT and GRPO) is sharded in place; the shards move to the mesh's device.

FSDP2 rebuilds a dataclass argument that holds tensors needing gradients, to hook them for its
post-backward; the ``LayerContext`` holds such tensors once an MoE layer has recorded its router
loss, and a later MoE layer would then record into a copy the model never reads.
``_keep_layer_context`` hands every layer the caller's context again (FSDP's hook still rides on
the hidden states).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from turbos.config import TurboSConfig
from turbos.distributed.context_parallel import context_parallel
from turbos.distributed.expert_parallel import ExpertParallelExperts, expert_parallel
from turbos.distributed.parallel import ParallelConfig, ParallelDims, ParallelError, world_size
from turbos.model.context import LayerContext
from turbos.model.hybrid import TurboSForCausalLM


def param_dtype(config: ParallelConfig, device: torch.device) -> torch.dtype:
    """Parameters' dtype in compute: bf16 for 'bf16', and for 'auto' on CUDA; fp32 otherwise."""
    if config.mixed_precision == "bf16" or (config.mixed_precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def recipe_parallelism(
    config: ParallelConfig,
    model: TurboSConfig,
    kind: str = "pre-training",
    device: torch.device | None = None,
) -> tuple[ParallelDims, Callable[[nn.Module], nn.Module] | None]:
    """A recipe's ``parallel:`` section on this world: its degrees, and the ``parallelize`` hook it
    asks of the training loop (FSDP2 on several ranks, activation checkpointing; None: nothing;
    ``device``: where a meta-built model is materialised). Context parallelism is pre-training's
    alone: another ``kind`` (its name for the error) is refused it, since its rows are padded or
    packed."""
    dims = ParallelDims.resolve(config, world_size(), model)
    if dims.cp > 1 and kind != "pre-training":
        raise ParallelError(
            f"parallel.cp={dims.cp}: {kind} does not split sequences over ranks (context parallelism "
            "is for pre-training, whose rows are unpadded); use cp=1"
        )
    if dims.world > 1 or config.activation_checkpointing:
        return dims, functools.partial(parallelize, dims=dims, config=config, device=device)
    return dims, None


def parallelize(
    model: nn.Module, dims: ParallelDims, config: ParallelConfig, device: torch.device | None = None
) -> nn.Module:
    """Apply expert parallelism, context parallelism, activation checkpointing (each if asked)
    and FSDP2 over all ranks to a ``TurboSForCausalLM``, in place (module docstring); returns it.
    One rank: checkpointing only. A model built on the meta device is sharded there, then
    materialised on ``device`` (``materialize``); otherwise ``device`` is its parameters'."""
    layers = model.model.layers
    built_on_meta = next(model.parameters()).is_meta
    if built_on_meta and (device is None or dims.world == 1):
        raise ValueError("a meta-built model needs several ranks and the device to materialise it on")
    device = device or next(model.parameters()).device
    ep_mesh = None
    if dims.ep > 1:
        ep_mesh = init_device_mesh(
            device.type, (dims.world // dims.ep, dims.ep), mesh_dim_names=("ep_replica", "ep")
        )
        expert_parallel(model, ep_mesh["ep"])
    if dims.cp > 1:
        cp_mesh = init_device_mesh(device.type, (dims.dp_shard, dims.cp), mesh_dim_names=("dp", "cp"))
        context_parallel(model, cp_mesh["cp"].get_group(), config.cp_mode)
    if config.activation_checkpointing:
        for layer in layers:
            checkpoint(layer)
    if dims.world == 1:
        return model
    mesh = init_device_mesh(device.type, (dims.world,), mesh_dim_names=("fsdp",))
    dtype = param_dtype(config, device)
    # No input casting: FSDP would rebuild the LayerContext argument, and the MoE layers would
    # leave their router losses in the copy. Activations follow the parameters' dtype anyway.
    policy = MixedPrecisionPolicy(
        param_dtype=None if dtype == torch.float32 else dtype,
        reduce_dtype=torch.float32,
        cast_forward_inputs=False,
    )
    for i, layer in enumerate(layers):
        # The last layer's parameters are needed again at once by backward: keep them gathered.
        reshard = i < len(layers) - 1
        for experts in layer.modules():
            if isinstance(experts, ExpertParallelExperts):
                fully_shard(
                    experts, mesh=ep_mesh["ep_replica"], mp_policy=policy, reshard_after_forward=reshard
                )
                experts.set_gradient_divide_factor(dims.world)
                if dims.world > dims.ep:  # gloo has no PREMUL_SUM (one replica sends nothing:
                    experts.set_force_sum_reduction_for_comms(True)  # forcing would divide twice)
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for layer in layers:
        _keep_layer_context(layer)
    if built_on_meta:
        materialize(model, device)
    return model


@torch.no_grad()
def materialize(model: TurboSForCausalLM, device: torch.device) -> None:
    """Allocate the shards of a model built on the meta device and sharded there, on ``device``,
    and initialise them with the draws of a single process (``init_weights``): each module's
    parameters are drawn whole on every rank, on the CPU as ``TurboSForCausalLM(config)`` draws
    them, one module at a time, and each rank keeps its shards. Under the same seed the weights
    are then bitwise those of ``TurboSForCausalLM(config)`` on one process, while no rank holds
    more than one module's whole parameters."""
    model.to_empty(device=device)
    seen: set[int] = set()
    owned: set[tuple[int, str]] = set()  # the first place of each parameter (tied ones: one)
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                owned.add((id(module), name))

    @contextlib.contextmanager
    def whole(module: nn.Module, names: list[str]) -> Iterator[None]:
        sharded = {name: module._parameters[name] for name in names}
        sharded = {name: p for name, p in sharded.items() if isinstance(p, DTensor)}
        for name, param in sharded.items():  # drawn on the CPU, as a single process draws
            full = torch.empty(param.shape, dtype=param.dtype)
            module._parameters[name] = nn.Parameter(full, requires_grad=param.requires_grad)
        try:
            yield
        finally:
            for name, param in sharded.items():
                full = module._parameters[name]
                if (id(module), name) in owned:
                    local = distribute_tensor(
                        full.detach().to(device), param.device_mesh, param.placements, src_data_rank=None
                    )
                    param.to_local().copy_(local.to_local())
                    param.__dict__.update(full.__dict__)  # marks such as _no_weight_decay
                module._parameters[name] = param

    model.init_weights(whole)


def _keep_layer_context(layer: nn.Module) -> None:
    """Around FSDP's pre-forward hook of ``layer``: put the caller's ``LayerContext`` back in
    place of the copy FSDP made, so MoE router losses land where the model reads them."""
    passed: list[tuple] = []

    def remember(_module: nn.Module, args: tuple) -> None:
        passed[:] = [args]

    def restore(_module: nn.Module, args: tuple) -> tuple:
        return tuple(
            old if isinstance(old, LayerContext) else new for old, new in zip(passed[0], args, strict=True)
        )

    layer.register_forward_pre_hook(remember, prepend=True)
    layer.register_forward_pre_hook(restore)

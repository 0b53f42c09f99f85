"""Modality-aware sparse MoE FFN on top of DeepSpeed's MoE (expert parallelism, GShard top-k gating).

EVE's router sees ``h + e_vision`` for image tokens and ``h + e_text`` for text tokens. As in the
authors' released code, the experts compute on that same sum, FFN(h + e_modality); with
``routing_embedding_to_experts=False`` they see ``h`` and only the router gets the embedding; with
``modality_aware=False`` there is no embedding (plain top-k routing, an ablation).
DeepSpeed's ``MOELayer`` routes and dispatches one tensor, and it forwards its second input untouched to
the gate (``used_token``, which top-2 gating ignores), so the per-token modality ids travel through that
channel; in the router-only variant the gate adds the embedding to its own input.
"""
import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from deepspeed.moe.experts import Experts
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import MOELayer, TopKGate
from deepspeed.utils import groups
from deepspeed.runtime.zero.partition_parameters import (is_zero_param, register_external_parameter,
                                                          restore_init_context, shutdown_init_context)

from eve_ds.model.init import fresh_seed, init_modules_, seeded_generator

VISION, TEXT = 0, 1
NUM_MODALITIES = 2
LOCAL_EXPERT_KEY = re.compile(r"(\.deepspeed_experts\.)(\d+)(\.)")


@dataclass(frozen=True)
class ExpertPlacement:
    """Where the experts of every MoE layer live. A layer's experts are cut into ``ep_size`` blocks of
    consecutive global indices, block r held by expert-parallel rank r, whose parameter names count its
    experts from 0 (``...deepspeed_experts.<local index>...``)."""
    num_experts: int
    ep_size: int = 1
    ep_rank: int = 0

    def __post_init__(self):
        if self.num_experts % self.ep_size:
            raise ValueError(f"num_experts ({self.num_experts}) is not divisible by expert-parallel size "
                             f"({self.ep_size})")

    @classmethod
    def of_global_rank(cls, global_rank: int, num_experts: int, ep_size: int) -> "ExpertPlacement":
        """DeepSpeed builds expert-parallel groups from consecutive global ranks ([0, 1], [2, 3], ... for
        ep_size 2), so global rank g is expert-parallel rank g % ep_size."""
        return cls(num_experts, ep_size, global_rank % ep_size)

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.ep_size

    def global_index(self, local_index: int) -> int:
        return self.ep_rank * self.num_local_experts + local_index

    def global_name(self, name: str) -> str:
        """A parameter name of this rank's model -> its name in the model that holds every expert."""
        return LOCAL_EXPERT_KEY.sub(lambda m: f"{m[1]}{self.global_index(int(m[2]))}{m[3]}", name)

    def global_names(self, module: nn.Module, prefix: str = "") -> dict:
        """Each name of ``module``'s state dict -> ``prefix`` + its name in the model that holds every expert (the
        renaming with which this rank reads its share of a whole model's weights)."""
        return {name: prefix + self.global_name(name) for name in module.state_dict()}

    def sharing_ranks(self, world_size: int) -> list:
        """The global ranks that hold the same experts (the expert-data-parallel group)."""
        return [rank for rank in range(world_size) if rank % self.ep_size == self.ep_rank]


class ModalityAwareGate(TopKGate):
    """Top-k gate whose router input is the hidden state plus a learned per-modality embedding; with
    ``input_has_embedding`` the layer has added the embedding already (the experts see it too), and without
    ``modality_aware`` there is none."""
    normal_init_parameters = ("modality_embed", )

    def __init__(self, hidden_size: int, num_experts: int, input_has_embedding: bool, modality_aware: bool = True,
                 **gate_kwargs):
        super().__init__(hidden_size, num_experts, **gate_kwargs)
        self.input_has_embedding = input_has_embedding or not modality_aware
        if modality_aware:
            self.modality_embed = nn.Parameter(torch.zeros(NUM_MODALITIES, hidden_size))
        else:
            self.normal_init_parameters = ()
        # [modality, expert] routed-token counts of the last forward, for logging only.
        # Integer counts: a bf16 engine casts floating buffers, and bf16 cannot count past 256.
        self.register_buffer("expert_load", torch.zeros(NUM_MODALITIES, num_experts, dtype=torch.long),
                             persistent=False)
        # DeepSpeed's forward reads the router weight rather than calling its Linear: ZeRO-3 gathers it with the gate.
        # (Not a ZeRO-3 leaf module: a leaf reduces its gradients after each call's backward, twice for a gate that
        # runs twice in one step, as in the retrieval model's three encoder passes.)
        register_external_parameter(self, self.wg.weight)

    def forward(self, input, modality_ids, sparse_routes=False, use_tutel=False):
        # DeepSpeed samples the second expert with Gumbel noise in eval mode too; evaluation and exported
        # models must route deterministically, so sample only while training.
        self.top2_2nd_expert_sampling = self.training
        modality_ids = modality_ids.reshape(-1)
        router_input = input.float()
        if not self.input_has_embedding:
            router_input = router_input + self.modality_embed.float()[modality_ids]
        gate_output = super().forward(router_input, None, sparse_routes, use_tutel)
        if sparse_routes:
            self._record_load(expert_indices=gate_output[3], modality_ids=modality_ids)
        return gate_output

    @torch.no_grad()
    def _record_load(self, expert_indices, modality_ids):
        # expert_indices: [k, tokens], -1 where the capacity limit dropped the route.
        kept = expert_indices >= 0
        modality = modality_ids.unsqueeze(0).expand_as(expert_indices)
        load = torch.zeros_like(self.expert_load)
        load.index_put_((modality[kept], expert_indices[kept].long()),
                        torch.ones((), device=load.device, dtype=load.dtype), accumulate=True)
        self.expert_load.copy_(load)


def expert_parallel_group(group_name: str, ep_size: int):
    """The expert-parallel process group of ``ep_size`` (DeepSpeed's), created on first use."""
    if group_name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return groups._get_expert_parallel_group(group_name)


def tag_for_expert_partitioning(params, group_name: str):
    """Tags expert parameters so that ZeRO-3 partitions each over its expert-data-parallel group (the ranks
    holding the same experts) rather than over all ranks, as it does for AutoEP's experts."""
    group = groups._get_expert_data_parallel_group(group_name)
    for param in params:
        param.ds_zero_placement_family = "autoep_expert"
        param.ds_zero_partition_group_name = group_name
        param.ds_zero_partition_process_group = group


@contextmanager
def zero_init_paused(paused: bool):
    """Modules built in this context keep whole parameters even inside ``deepspeed.zero.Init``, which would
    partition them over all ranks as each module is built."""
    if paused:
        shutdown_init_context()
    try:
        yield
    finally:
        if paused:
            restore_init_context()


class LocalExperts(Experts):
    """This rank's experts, each built by ``build(local_index)``: DeepSpeed's ``Experts`` deep-copies one template,
    which ``deepspeed.zero.Init`` would already have partitioned."""

    def __init__(self, build, num_local_experts: int, expert_group_name: str):
        nn.Module.__init__(self)
        self.deepspeed_experts = nn.ModuleList(build(index) for index in range(num_local_experts))
        self.num_local_experts = num_local_experts
        for param in self.deepspeed_experts.parameters():  # what the DeepSpeed engine reads of expert parameters
            param.allreduce = False
            param.group_name = expert_group_name


class ModalityAwareMoE(nn.Module):
    """Sparse top-k MoE FFN with modality-aware routing; ``make_expert()`` builds one expert.

    Built from DeepSpeed's MoE pieces (``MOELayer`` for dispatch and all-to-all, ``Experts``), with the
    attributes and ``set_deepspeed_parallelism`` hook the DeepSpeed engine expects of an MoE layer. Under
    ``deepspeed.zero.Init`` each expert is built whole, initialised, and then partitioned over its
    expert-data-parallel group (the ranks that hold it), not over all ranks as zero.Init would.
    """

    def __init__(self, hidden_size: int, make_expert, placement: ExpertPlacement, k: int = 2,
                 capacity_factor: float = 1.0, eval_capacity_factor: float = 1.0, min_capacity: int = 4,
                 init_std: float = 0.02, routing_embedding_to_experts: bool = True, modality_aware: bool = True,
                 init_seed: int = None):
        nn.Module.__init__(self)  # not super(): EngineManagedMoE puts DeepSpeed's MoE next in line
        num_experts, ep_size = placement.num_experts, placement.ep_size
        self.num_experts, self.ep_size = num_experts, ep_size
        self.num_local_experts = placement.num_local_experts
        self.expert_group_name = f"ep_size_{ep_size}"
        self.routing_embedding_to_experts = routing_embedding_to_experts and modality_aware
        gate = ModalityAwareGate(hidden_size, num_experts, routing_embedding_to_experts, modality_aware, k=k,
                                 capacity_factor=capacity_factor,
                                 eval_capacity_factor=eval_capacity_factor, min_capacity=min_capacity,
                                 noisy_gate_policy=None, drop_tokens=True, use_rts=True, top2_2nd_expert_sampling=True)
        seed = init_seed if init_seed is not None else fresh_seed()
        init_modules_(gate.modules(), init_std, seeded_generator(seed))

        def build_expert(local_index):
            # A generator keyed by the expert's global index: the weights differ between experts but not with how
            # experts are spread over ranks.
            expert = make_expert()
            init_modules_(expert.modules(), init_std, seeded_generator(seed + 1 + placement.global_index(local_index)))
            return expert

        partitioned = is_zero_param(gate.wg.weight)  # built under deepspeed.zero.Init
        with zero_init_paused(partitioned):
            experts = LocalExperts(build_expert, self.num_local_experts, self.expert_group_name)
        if partitioned:
            expert_parallel_group(self.expert_group_name, ep_size)
            experts.to(gate.wg.weight.dtype)
            tag_for_expert_partitioning(experts.parameters(), self.expert_group_name)
            gate.wg.weight.convert_to_zero_parameters(list(experts.parameters()))
        self.deepspeed_moe = MOELayer(gate, experts, self.expert_group_name, ep_size, self.num_local_experts)
        if self.routing_embedding_to_experts:
            # This layer reads the gate's embedding outside the gate's forward: ZeRO-3 must gather it here too.
            register_external_parameter(self, gate.modality_embed)

    @property
    def gate(self) -> ModalityAwareGate:
        return self.deepspeed_moe.gate

    @property
    def local_experts(self) -> nn.ModuleList:
        return self.deepspeed_moe.experts.deepspeed_experts

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False):
        """Called by the DeepSpeed engine: joins the expert-parallel group, and tags expert parameters so that
        ZeRO-3 partitions each over the expert-data-parallel group (the ranks holding the same experts)
        rather than over all ranks, as it does for AutoEP's experts."""
        if use_data_before_expert_parallel_:
            raise ValueError("use_data_before_expert_parallel_ is not supported: experts are initialised for "
                             "DeepSpeed's default layout of expert-parallel groups")
        self.deepspeed_moe._set_ep_group(expert_parallel_group(self.expert_group_name, self.ep_size))
        tag_for_expert_partitioning(self.local_experts.parameters(), self.expert_group_name)

    def forward(self, hidden_states: torch.Tensor, modality_ids: torch.Tensor):
        """Returns the FFN output (shape of ``hidden_states``) and the auxiliary load-balancing loss."""
        if self.routing_embedding_to_experts:
            hidden_states = hidden_states + self.gate.modality_embed.to(hidden_states.dtype)[modality_ids]
        output = self.deepspeed_moe(hidden_states, modality_ids)
        return output, self.deepspeed_moe.l_aux


class EngineManagedMoE(ModalityAwareMoE, MoE):
    """The same layer, seen by the DeepSpeed engine as its native MoE: ZeRO stages 0-2 then reduce expert
    gradients over the expert-data-parallel group and write one checkpoint file per expert. Stage 3
    refuses native MoE layers, so there the plain ``ModalityAwareMoE`` runs with tagged experts."""


def use_engine_managed_moe(model: nn.Module, enabled: bool = True):
    """Switches every MoE layer of ``model`` between the two classes (same parameters, same behaviour)."""
    for module in model.modules():
        if isinstance(module, ModalityAwareMoE):
            module.__class__ = EngineManagedMoE if enabled else ModalityAwareMoE

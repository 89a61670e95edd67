"""Configuration of the Dynamic-Capacity MoE layer (paper defaults: 8 routed + 1 null + 2 shared, p = 0.7)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

COMBINE_WEIGHTS = ("renormalize", "raw", "reference")


@dataclass
class MoEConfig:
    # Sizes.
    hidden_size: int
    routed_ffn_size: int  # width of one routed SwiGLU expert (paper: dense width / 4)
    shared_ffn_size: int  # width of one shared SwiGLU expert (paper: dense width / 8)
    num_routed_experts: int = 8
    num_null_experts: int = 1  # routing columns only: no parameters, no FLOPs, never sent
    num_shared_experts: int = 2
    # Top-P routing over the dynamic candidates (routed + null).
    top_p: float = 0.7
    min_k: int = 1  # bounds on the number of dynamic candidates kept per token (null included)
    max_k: int | None = None  # None: no upper bound; min_k == max_k: plain top-k
    # Combine weights of the kept candidates (moe.router.combine_weights, which says what each does to the
    # gate's gradient): "renormalize" p / sum over the kept set incl. null (paper Eq. 3); "raw" the softmax
    # itself (Huang et al. 2024); "reference" the released code's (near-ties within a relative 2 * tie_eps
    # share, the rest 1 each, then renormalised: about 1/k per kept candidate).
    combine_weights: str = "renormalize"
    tie_eps: float = 0.01  # "reference" only: the released config's router_jitter_noise
    gate_shared: bool = True  # shared experts gated by the same router (reference code); False: weight 1
    input_jitter: float = 0.01  # multiplicative U(1-eps, 1+eps) noise on the router input in training
    # Losses (weights are applied by moe.losses.combine_aux, the layer returns unweighted values).
    balance_weight: float = 0.025
    balance_weight_min: float = 0.001
    balance_decay_steps: int = 10000
    z_loss_weight: float = 0.0
    entropy_loss_weight: float = 0.0
    # Stats: routing collapse when the normalised entropy of the routed load falls below this.
    collapse_entropy_threshold: float = 0.5
    init_std: float = 0.02

    def __post_init__(self):
        def need(cond: bool, msg: str):
            if not cond:
                raise ValueError(f"MoEConfig: {msg}")

        for name in ("hidden_size", "routed_ffn_size", "num_routed_experts"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                 f"{name} must be a positive int, got {getattr(self, name)!r}")
        for name in ("shared_ffn_size", "num_null_experts", "num_shared_experts", "balance_decay_steps"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 0,
                 f"{name} must be an int >= 0, got {getattr(self, name)!r}")
        need(self.num_shared_experts == 0 or self.shared_ffn_size > 0,
             f"shared_ffn_size must be > 0 when num_shared_experts={self.num_shared_experts}")
        need(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        n_dyn = self.num_dynamic_experts
        need(1 <= self.min_k <= n_dyn,
             f"min_k must be in [1, num_routed_experts + num_null_experts = {n_dyn}], got {self.min_k}")
        if self.max_k is not None:
            need(self.min_k <= self.max_k <= n_dyn,
                 f"max_k must be in [min_k={self.min_k}, {n_dyn}] or None, got {self.max_k}")
        need(0.0 <= self.input_jitter < 1.0, f"input_jitter must be in [0, 1), got {self.input_jitter}")
        for name in ("balance_weight", "balance_weight_min", "z_loss_weight", "entropy_loss_weight"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(0.0 <= self.collapse_entropy_threshold <= 1.0,
             f"collapse_entropy_threshold must be in [0, 1], got {self.collapse_entropy_threshold}")
        need(self.combine_weights in COMBINE_WEIGHTS,
             f"combine_weights must be one of {COMBINE_WEIGHTS}, got {self.combine_weights!r}")
        need(self.tie_eps >= 0, f"tie_eps must be >= 0, got {self.tie_eps}")

    @property
    def num_dynamic_experts(self) -> int:
        return self.num_routed_experts + self.num_null_experts

    @property
    def num_gate_outputs(self) -> int:
        return self.num_routed_experts + self.num_null_experts + self.num_shared_experts

    def to_dict(self) -> dict:
        return asdict(self)

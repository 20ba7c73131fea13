"""How an encoder's own weights take part in training (``encoder.adapt``): ``frozen``, ``lora`` or ``full``.

* ``frozen`` (the study's recipe, the default): no encoder parameter trains; features can be cached.
* ``lora``: low-rank adapters (the ``peft`` library's LoRA layers, injected in place, no wrapper model) on the
  attention projections of the encoder's blocks; only the adapters (and the decoder) train, the pretrained weights
  stay bit-identical. Adapters start at zero (LoRA's B matrices), so step 0 gives the frozen features.
* ``full``: every encoder parameter trains, at its own learning rate (``encoder.lr``).

Which modules LoRA adapts is each encoder's choice (:attr:`FrozenEncoder.lora_targets`: module-name suffixes, e.g.
timm ViTs' ``qkv`` and ``proj``); ``encoder.lora.targets`` replaces it. ``peft`` is imported only for ``lora``.
A torch ``MultiheadAttention`` (CLIP's blocks) is adapted on its joint q/k/v projection weight through peft's
parameter LoRA (``target_parameters``): peft's module-level LoRA for it merges the adapters into the base weights
and subtracts them again on every forward, which changes those weights by float rounding (they would no longer be
the pretrained ones), and peft cannot also wrap the out-projection of the same module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from deeploc.errors import DeeplocError
from deeploc.models.state_dicts import state_dict_mismatch

__all__ = [
    "ADAPTATIONS",
    "LORA_DEFAULTS",
    "Adaptable",
    "AdaptationError",
    "check_adapt",
    "inject_lora",
    "lora_module_names",
    "lora_settings",
    "merge_lora",
]

ADAPTATIONS = ("frozen", "lora", "full")
LORA_DEFAULTS: dict[str, Any] = {"rank": 8, "alpha": 16.0, "targets": None, "dropout": 0.0}
# Constructor keywords of the adaptation (encoder.adapt, encoder.lora, encoder.lr); left out of the recorded
# options of a frozen encoder, so frozen runs record exactly what they did before adaptation existed.
ADAPT_KEYS = ("adapt", "lora", "lr")
# Module types peft's LoRA can wrap.
_LORA_TYPES = (nn.Linear, nn.Conv2d, nn.MultiheadAttention)


class AdaptationError(DeeplocError, ValueError):
    """An ``encoder.adapt`` / ``encoder.lora`` / ``encoder.lr`` setting that cannot be used."""


def check_adapt(adapt: Any) -> str:
    """``adapt`` when it is one of :data:`ADAPTATIONS`, else one clear line listing them."""
    if adapt not in ADAPTATIONS:
        raise AdaptationError(f"encoder.adapt={adapt!r} is not one of {'|'.join(ADAPTATIONS)} (docs/backbones.md)")
    return str(adapt)


def lora_settings(lora: Mapping[str, Any] | None, default_targets: Sequence[str]) -> dict[str, Any]:
    """``encoder.lora`` completed with the defaults (targets: the encoder's), checked; plain values."""
    given = dict(lora or {})
    unknown = sorted(set(given) - set(LORA_DEFAULTS))
    if unknown:
        raise AdaptationError(f"encoder.lora has unknown key(s) {unknown}; its keys are {list(LORA_DEFAULTS)}")
    settings = {**LORA_DEFAULTS, **given}
    targets = settings["targets"] if settings["targets"] is not None else list(default_targets)
    settings["targets"] = [targets] if isinstance(targets, str) else [str(t) for t in targets]
    rank, alpha, dropout = settings["rank"], settings["alpha"], settings["dropout"]
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise AdaptationError(f"encoder.lora.rank={rank!r} must be a positive integer (e.g. 8)")
    if not isinstance(alpha, int | float) or alpha <= 0:
        raise AdaptationError(f"encoder.lora.alpha={alpha!r} must be a positive number (e.g. 16)")
    if not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise AdaptationError(f"encoder.lora.dropout={dropout!r} must be in [0, 1)")
    if not settings["targets"]:
        raise AdaptationError("encoder.lora.targets is empty; name module suffixes to adapt, e.g. [qkv,proj]")
    return {"rank": rank, "alpha": float(alpha), "targets": settings["targets"], "dropout": float(dropout)}


def lora_module_names(model: nn.Module, scope: str, targets: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(modules, parameters)`` peft adapts: the names (in ``model``) of the Linear / Conv2d modules under ``scope``
    whose last name part is one of ``targets``, and the q/k/v weights of such MultiheadAttention modules."""
    prefix = f"{scope}." if scope else ""
    chosen = [
        (name, module)
        for name, module in model.named_modules()
        if name.startswith(prefix) and name.rsplit(".", 1)[-1] in targets and isinstance(module, _LORA_TYPES)
    ]
    modules = [name for name, module in chosen if not isinstance(module, nn.MultiheadAttention)]
    parameters = [f"{name}.in_proj_weight" for name, module in chosen if isinstance(module, nn.MultiheadAttention)]
    if not chosen:
        layers = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, _LORA_TYPES)})
        raise AdaptationError(
            f"encoder.lora.targets={list(targets)} match no Linear/Conv2d/MultiheadAttention module under "
            f"{scope or 'the model'}; its adaptable module names end in {layers[:12]}"
        )
    return modules, parameters


def inject_lora(
    model: nn.Module, settings: Mapping[str, Any], modules: Sequence[str], parameters: Sequence[str] = ()
) -> None:
    """Put peft LoRA adapters on the ``modules`` and ``parameters`` of ``model`` in place; only they require grad
    after."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=settings["rank"],
        lora_alpha=settings["alpha"],
        lora_dropout=settings["dropout"],
        target_modules=list(modules),
        target_parameters=list(parameters) or None,
    )
    inject_adapter_in_model(config, model)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA adapter into its base weights (peft's ``merge``); returns how many were merged."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for layer in layers:
        layer.merge()
    return len(layers)


class Adaptable:
    """The adaptation side of :class:`~deeploc.models.encoders.FrozenEncoder` (a mixin before ``RecordsOptions``
    and ``nn.Module``): its settings, what trains, what checkpoints carry, its identity entries."""

    #: Module-name suffixes LoRA adapts by default (the attention projections), and the module they live under.
    lora_targets: ClassVar[tuple[str, ...]] = ("qkv", "proj")
    lora_scope: ClassVar[str] = ""
    model: nn.Module

    def setup_adaptation(self, adapt: str, lora: Mapping[str, Any] | None, lr: float | None) -> None:
        """Check and keep ``encoder.adapt`` / ``encoder.lora`` / ``encoder.lr`` (before the network is built)."""
        self.adapt = check_adapt(adapt)
        self.lora = lora_settings(lora, self.lora_targets) if self.adapt == "lora" else None
        if lr is not None and (not isinstance(lr, int | float) or isinstance(lr, bool) or lr <= 0):
            raise AdaptationError(f"encoder.lr={lr!r} must be a positive number, or null for model.lr")
        self.lr = None if lr is None else float(lr)

    def apply_adaptation(self, seed: int) -> None:
        """Make the (loaded, frozen) network trainable as ``adapt`` says; LoRA's initial adapters from ``seed``."""
        if self.adapt == "full":
            self.model.requires_grad_(True)
        elif self.lora is not None:
            with torch.random.fork_rng(devices=[]):  # the adapters' initial A matrices, the same in every process
                torch.manual_seed(seed)
                inject_lora(
                    self.model, self.lora, *lora_module_names(self.model, self.lora_scope, self.lora["targets"])
                )

    def options(self) -> dict[str, Any]:
        """The constructor keywords; a frozen encoder's leave out the adaptation keys (recorded as before them)."""
        options = super().options()  # type: ignore[misc]
        if self.adapt == "frozen":
            options = {k: v for k, v in options.items() if k not in ADAPT_KEYS}
        return options

    def train(self, mode: bool = True) -> Any:
        """A frozen encoder stays in eval mode whatever the trainer asks; an adapted one follows the trainer."""
        return super().train(mode and self.adapt != "frozen")  # type: ignore[misc]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters that train with ``adapt`` (none when frozen; LoRA adapters; every one when full)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def tuned_keys(self) -> list[str]:
        """Keys of ``state_dict()`` that checkpoints and exports carry: none when frozen (rebuilt from the weights
        file), the adapters' with LoRA, every tensor with full fine-tuning."""
        if self.adapt == "frozen":
            return []
        keys = list(self.state_dict())  # type: ignore[attr-defined]
        return [k for k in keys if "lora_" in k] if self.adapt == "lora" else keys

    def load_tuned_state(self, state: Mapping[str, torch.Tensor], source: str) -> None:
        """Load the tuned tensors a checkpoint or export carries (:meth:`tuned_keys`), refusing any other set."""
        tuned = set(self.tuned_keys())
        details = state_dict_mismatch({k: v for k, v in self.state_dict().items() if k in tuned}, state)  # type: ignore[attr-defined]
        if details:
            raise AdaptationError(
                f"{source}: its tuned encoder tensors do not fit encoder.adapt={self.adapt} ({details})"
            )
        if state:
            self.load_state_dict(dict(state), strict=False)  # type: ignore[attr-defined]

    def adaptation(self) -> dict[str, Any]:
        """The identity entries of the adaptation: ``{}`` when frozen (identities as before adaptation existed),
        else ``adapt`` and, with LoRA, its settings. ``weights`` stays the base weights' digest; the tuned tensors
        travel in checkpoints and exports (:meth:`tuned_keys`)."""
        if self.adapt == "frozen":
            return {}
        return {"adapt": self.adapt, **({"lora": dict(self.lora)} if self.lora is not None else {})}

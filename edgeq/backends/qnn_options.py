"""Typed settings for the QNN execution provider, and how they map to its string provider options.

``QnnOptions.for_soc`` turns the user's ``--soc`` value into a target (see :mod:`edgeq.backends.qnn_soc` for the
table of chips and HTP generations); :meth:`QnnOptions.provider_options` gives the key/value pairs the EP reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from edgeq.backends.qnn_soc import KNOWN_SOCS, SocTarget, lookup_soc, parse_htp_arch, resolve_soc
from edgeq.errors import EdgeqError

PERFORMANCE_MODES = (
    "default", "burst", "balanced", "high_performance", "sustained_high_performance", "high_power_saver",
    "power_saver", "low_power_saver", "low_balanced", "extreme_power_saver",
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class QnnOptions:
    """QNN EP settings. Build from a ``--soc`` value with :meth:`for_soc`; see :mod:`edgeq.backends.qnn_soc`.

    ``soc_model`` is a chip name or QNN SoC ID from :data:`KNOWN_SOCS` (normalised to the chip name) and implies
    ``htp_arch``; ``htp_arch`` alone (``"v73"`` or ``"73"``, normalised to ``"v73"``) targets an HTP generation.
    Neither set: the EP compiles for whatever device it finds (on x86_64, the emulator's default).
    """

    soc_model: str | None = None
    htp_arch: str | None = None
    backend: Literal["htp"] = "htp"
    #: Fail instead of running nodes QNN does not take on the CPU (also makes QNN quantize graph inputs itself).
    disable_cpu_fallback: bool = True
    htp_performance_mode: str = "default"
    #: Let the HTP run float32 ops (if any remain) in fp16; QDQ groups are unaffected.
    enable_htp_fp16_precision: bool = True
    #: 0 = EP default, 1 = fastest preparation, 3 = slowest preparation and best graph.
    graph_optimization_mode: int = 0
    vtcm_mb: int | None = None
    #: Run the graph inputs' QuantizeLinear and outputs' DequantizeLinear on the CPU (the EP's default is on;
    #: edgeq turns it off so that the whole QDQ graph, I/O conversion included, is what the HTP runs).
    offload_graph_io_quantization: bool = False

    def __post_init__(self) -> None:
        if self.backend != "htp":
            raise EdgeqError(f"unsupported QNN backend {self.backend!r}; edgeq targets the HTP only (backend='htp')")
        arch = parse_htp_arch(self.htp_arch) if self.htp_arch is not None else None
        if self.soc_model is not None:
            soc = lookup_soc(self.soc_model)
            if arch is not None and arch != soc.htp_arch:
                raise EdgeqError(
                    f"soc_model {soc.name} ({soc.device}) has HTP v{soc.htp_arch}, not v{arch}; drop htp_arch or fix it"
                )
            object.__setattr__(self, "soc_model", soc.name)
            arch = soc.htp_arch
        if arch is not None:
            object.__setattr__(self, "htp_arch", f"v{arch}")
        if self.htp_performance_mode not in PERFORMANCE_MODES:
            raise EdgeqError(
                f"unknown htp_performance_mode {self.htp_performance_mode!r}; valid: {', '.join(PERFORMANCE_MODES)}"
            )
        if self.graph_optimization_mode not in (0, 1, 2, 3):
            raise EdgeqError(f"graph_optimization_mode must be 0, 1, 2 or 3, not {self.graph_optimization_mode!r}")
        if self.vtcm_mb is not None and self.vtcm_mb <= 0:
            raise EdgeqError(f"vtcm_mb must be a positive number of MB, not {self.vtcm_mb!r}")

    @classmethod
    def for_soc(cls, soc: str | None, **options) -> QnnOptions:
        """Options for a user's ``--soc`` value (chip name like ``SM8650`` or ``v75``; ``None``: no target)."""
        if soc is None:
            return cls(**options)
        target = resolve_soc(soc)
        if target.soc is not None:
            return cls(soc_model=target.soc.name, **options)
        return cls(htp_arch=f"v{target.htp_arch}", **options)

    @property
    def target(self) -> SocTarget | None:
        if self.soc_model is not None:
            soc = KNOWN_SOCS[self.soc_model]
            return SocTarget(soc=soc, htp_arch=soc.htp_arch)
        return SocTarget(soc=None, htp_arch=parse_htp_arch(self.htp_arch)) if self.htp_arch else None

    def provider_options(self) -> dict[str, str]:
        """The QNN EP provider options (string key/values) these settings map to."""
        options = {
            "backend_type": self.backend,
            "htp_performance_mode": self.htp_performance_mode,
            "offload_graph_io_quantization": "1" if self.offload_graph_io_quantization else "0",
        }
        if self.soc_model is not None:
            options["soc_model"] = str(KNOWN_SOCS[self.soc_model].soc_model)
        # The EP refuses an explicit "1" without a soc_model, although "1" is its default.
        if not self.enable_htp_fp16_precision or self.soc_model is not None:
            options["enable_htp_fp16_precision"] = "1" if self.enable_htp_fp16_precision else "0"
        if self.htp_arch is not None:
            options["htp_arch"] = self.htp_arch.removeprefix("v")
        if self.graph_optimization_mode:
            options["htp_graph_finalization_optimization_mode"] = str(self.graph_optimization_mode)
        if self.vtcm_mb is not None:
            options["vtcm_mb"] = str(self.vtcm_mb)
        return options

    def describe(self) -> str:
        target = self.target
        return f"QNN HTP ({target.label})" if target else "QNN HTP (no SoC set)"

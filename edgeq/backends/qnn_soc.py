"""Snapdragon SoCs and HTP architectures that edgeq can target through the QNN execution provider.

The user-facing ``--soc`` value is either a chip name or an HTP architecture:

========================  ================  ==========  ===================================
``--soc``                 QNN ``soc_model``  ``htp_arch``  device
========================  ================  ==========  ===================================
``SM8350``                30                68          Snapdragon 888
``SM8450``                36                69          Snapdragon 8 Gen 1
``SM8475``                42                69          Snapdragon 8+ Gen 1
``SM8550``                43                73          Snapdragon 8 Gen 2
``SC8380XP``              60                73          Snapdragon X Elite / X Plus
``SM8650``                57                75          Snapdragon 8 Gen 3
``SM8750``                69                79          Snapdragon 8 Elite
``SM8850``                87                81          Snapdragon 8 Elite Gen 5
``SC8480XP``              88                81          Snapdragon X2 Elite
``v68`` … ``v81``         (not set)          68 … 81     any SoC with that HTP generation
========================  ================  ==========  ===================================

Chip names are case-insensitive. A chip name sets both provider options (the EP gives ``soc_model`` priority
when they disagree); an architecture sets only ``htp_arch``, which is enough to compile a context binary but
lets the EP pick generic HTP settings for that generation. The numeric IDs are QNN's ``Qnn_SocModel_t`` values,
which is what the QNN EP's ``soc_model`` option takes. Anything else is rejected here, because the EP itself only
logs a warning for an unknown value and silently compiles for "unknown SoC".
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeq.errors import EdgeqError


@dataclass(frozen=True)
class SocInfo:
    """One Snapdragon chip: its name, QNN ``Qnn_SocModel_t`` ID, HTP generation and marketing name."""

    name: str
    soc_model: int
    htp_arch: int
    device: str


KNOWN_SOCS: dict[str, SocInfo] = {
    soc.name: soc
    for soc in (
        SocInfo("SM8350", 30, 68, "Snapdragon 888"),
        SocInfo("SM8450", 36, 69, "Snapdragon 8 Gen 1"),
        SocInfo("SM8475", 42, 69, "Snapdragon 8+ Gen 1"),
        SocInfo("SM8550", 43, 73, "Snapdragon 8 Gen 2"),
        SocInfo("SC8380XP", 60, 73, "Snapdragon X Elite / X Plus"),
        SocInfo("SM8650", 57, 75, "Snapdragon 8 Gen 3"),
        SocInfo("SM8750", 69, 79, "Snapdragon 8 Elite"),
        SocInfo("SM8850", 87, 81, "Snapdragon 8 Elite Gen 5"),
        SocInfo("SC8480XP", 88, 81, "Snapdragon X2 Elite"),
    )
}

#: HTP generations the QNN EP (onnxruntime-qnn 2.x) accepts for its ``htp_arch`` option.
HTP_ARCHS: tuple[int, ...] = (68, 69, 73, 75, 79, 81)


@dataclass(frozen=True)
class SocTarget:
    """A resolved ``--soc`` value: the chip (if one was named) and the HTP generation."""

    soc: SocInfo | None
    htp_arch: int

    @property
    def label(self) -> str:
        return f"{self.soc.name} ({self.soc.device}, HTP v{self.htp_arch})" if self.soc else f"HTP v{self.htp_arch}"


def valid_soc_values() -> list[str]:
    return [*KNOWN_SOCS, *(f"v{arch}" for arch in HTP_ARCHS)]


def parse_htp_arch(value: str | int) -> int:
    """``"v73"``, ``"V73"``, ``"73"`` or ``73`` → ``73``; anything outside :data:`HTP_ARCHS` is an EdgeqError."""
    text = str(value).strip().lower().removeprefix("v")
    if text.isdigit() and int(text) in HTP_ARCHS:
        return int(text)
    raise EdgeqError(f"unknown HTP architecture {value!r}; valid values: {', '.join(f'v{a}' for a in HTP_ARCHS)}")


def lookup_soc(value: str | int) -> SocInfo:
    """A chip name (``"sm8650"``) or its QNN ``soc_model`` ID (``57``) → :class:`SocInfo`."""
    text = str(value).strip().upper()
    if text in KNOWN_SOCS:
        return KNOWN_SOCS[text]
    if text.isdigit():
        for soc in KNOWN_SOCS.values():
            if soc.soc_model == int(text):
                return soc
    hint = " (an HTP architecture goes in htp_arch, or use QnnOptions.for_soc)" if text.startswith("V") else ""
    raise EdgeqError(
        f"unknown Snapdragon SoC {value!r}{hint}; valid chip names: {', '.join(KNOWN_SOCS)} "
        f"(or their QNN soc_model IDs: {', '.join(str(s.soc_model) for s in KNOWN_SOCS.values())})"
    )


def resolve_soc(value: str) -> SocTarget:
    """Resolve a user's ``--soc`` value: a chip name from :data:`KNOWN_SOCS` or an HTP architecture ``vNN``.

    Numeric SoC IDs are not accepted here because ``69`` would be ambiguous (SM8750's ID and HTP v69);
    pass them to ``QnnOptions(soc_model=...)`` instead.
    """
    text = value.strip()
    if text[:1] in ("v", "V") and text[1:].isdigit():
        return SocTarget(soc=None, htp_arch=parse_htp_arch(text))
    if text.upper() in KNOWN_SOCS:
        soc = KNOWN_SOCS[text.upper()]
        return SocTarget(soc=soc, htp_arch=soc.htp_arch)
    raise EdgeqError(f"unknown --soc value {value!r}; valid values: {', '.join(valid_soc_values())}")

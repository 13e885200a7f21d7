"""The settings of multi-series DICOM cases (config data.case_key, channels,
channel_keyword, reference_channel): checked and matched here, without reading DICOM, so
that the configuration check (`radflow.config`) and the index (`radflow.dicom.cases`)
share one definition."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

#: The config data: keys of multi-series cases and masks (the index's parameters).
CASE_KEYS = ("case_key", "channels", "channel_keyword", "masks_key", "masks_column",
             "mask_labels")  # fmt: skip


def channel_problems(
    case_key: str | None, channels: Mapping[str, str] | None, reference_channel: str | None
) -> list[str]:
    """What is wrong with a DICOM tree's multi-series case settings (data.case_key,
    channels, reference_channel): one message each, naming the key. The keywords
    themselves are checked against pydicom's dictionary by the index."""
    channels = dict(channels or {})
    problems = []
    if bool(case_key) != bool(channels):
        problems.append("data.case_key and data.channels go together: set both (a case of "
                        "several series) or neither")  # fmt: skip
    for name, pattern in channels.items():
        try:
            re.compile(pattern)
        except re.error as exc:
            problems.append(f"data.channels.{name}: {pattern!r} is not a regular expression "
                            f"({exc})")  # fmt: skip
    if reference_channel and channels and reference_channel not in channels:
        problems.append(f"data.reference_channel {reference_channel!r} is not one of "
                        f"data.channels ({', '.join(channels)})")  # fmt: skip
    return problems


@dataclass(frozen=True)
class CaseSettings:
    """How units become cases (config data.case_key, channels, channel_keyword,
    reference_channel). `case_key` None: every unit is its own case (channel "")."""

    case_key: str | None = None
    channels: tuple[tuple[str, str], ...] = ()  # (name, pattern), the reference first
    channel_keyword: str = "SeriesDescription"

    @classmethod
    def build(cls, case_key: str | None, channels: Mapping[str, str] | None,
              channel_keyword: str = "SeriesDescription",
              reference_channel: str | None = None) -> CaseSettings:  # fmt: skip
        """Checked settings (not the keywords: the index checks them against pydicom's
        dictionary); raises ValueError naming the config key."""
        channels = dict(channels or {})
        problems = channel_problems(case_key, channels, reference_channel)
        if problems:
            raise ValueError("; ".join(problems))
        names = list(channels)
        if reference_channel and channels:
            names.remove(reference_channel)
            names.insert(0, reference_channel)
        return cls(case_key or None, tuple((n, channels[n]) for n in names), channel_keyword)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.channels] or [""]

    @property
    def keywords(self) -> tuple[str, ...]:
        """Header keywords the index must read for these settings."""
        return (self.case_key, self.channel_keyword) if self.case_key else ()

    def match(self, value: str) -> list[str]:
        """The channels whose pattern is found in `value` (re.search)."""
        return [name for name, pattern in self.channels if re.search(pattern, value)]

    def describe(self, name: str) -> str:
        pattern = dict(self.channels)[name]
        return f"{name} ({pattern!r} in {self.channel_keyword})"

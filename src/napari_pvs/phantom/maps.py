"""What the phantom's region and confounder maps hold (see docs/architecture.md)."""

from __future__ import annotations

#: Region map labels (see docs/architecture.md).
REGION_NAMES: dict[int, str] = {1: "white_matter", 2: "basal_ganglia", 3: "grey_matter", 4: "csf"}

#: Confounder map labels: structures that look like PVS but must not be labelled as PVS.
CONFOUNDER_NAMES: dict[int, str] = {1: "lacune", 2: "wmh", 3: "vessel"}

WHITE_MATTER, BASAL_GANGLIA, GREY_MATTER, CSF = 1, 2, 3, 4

LACUNE, WMH, VESSEL = 1, 2, 3

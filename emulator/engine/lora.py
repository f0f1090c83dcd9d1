"""GPU slots for LoRA adapters (vLLM's ``max_loras``), least recently used first out."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class LoraSlots:
    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._resident: OrderedDict[str, None] = OrderedDict()

    @property
    def resident(self) -> list[str]:
        """Adapters in GPU slots, least recently used first."""
        return list(self._resident)

    def all_resident(self, adapters: Sequence[str]) -> bool:
        return all(adapter in self._resident for adapter in adapters)

    def activate(self, adapters: Sequence[str]) -> int:
        """Make a batch's adapters resident; returns how many had to be loaded into a slot.

        Resident ones are refreshed first, so a load never evicts an adapter this batch needs.
        """
        resident = self._resident
        missing = []
        for adapter in adapters:
            if adapter in resident:
                resident.move_to_end(adapter)
            else:
                missing.append(adapter)
        for adapter in missing:
            if len(resident) >= self.num_slots:
                resident.popitem(last=False)
            resident[adapter] = None
        return len(missing)

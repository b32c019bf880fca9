"""A zip archive written member by member that a killed process can carry on writing.

ZipFile writes an archive's central directory (the list of its members) only when it is
closed: a file cut off before then is no zip. `ResumableZip.state()` returns, after any
complete member, what that directory would list and where the next member starts. Given
that state, a new process cuts the file back to where the last complete member ended and
appends from there; closing writes a directory that lists every member, old and new. A
block-by-block compile (snncc.parts) writes its artifact this way, one block's weights at a
time, so the weights are written once and a killed compile keeps what it wrote.

The state is the writer's own record; the finished file is read back as any artifact is
(snncc.artifact checks every member), so a damaged state can spoil the output but not run code.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

# The ZipInfo fields the central directory is written from.
_FIELDS = ("filename", "date_time", "compress_type", "flag_bits", "CRC", "compress_size", "file_size",
           "header_offset", "external_attr", "create_version", "extract_version", "create_system")


class ResumableZip:
    """A stored (uncompressed) zip at `path`: fresh, or carried on from `state` (see the module
    docstring). `archive` is the open ZipFile to write members to."""

    def __init__(self, path: Path, state: dict | None = None):
        self.path = Path(path)
        members = [_member(record) for record in state["members"]] if state else []
        end = int(state["end"]) if state else 0
        self._file = self.path.open("r+b" if state else "w+b")
        try:
            if self._file.seek(0, 2) < end or any(m.header_offset + m.file_size > end for m in members):
                raise ValueError(f"{self.path} is shorter than its recorded members")
            self._file.truncate(end)
            self._file.seek(end)  # ZipFile appends from where the file stands
            self.archive = zipfile.ZipFile(self._file, "w", zipfile.ZIP_STORED, allowZip64=True)
        except BaseException:
            self._file.close()
            raise
        for member in members:
            self.archive.filelist.append(member)
            self.archive.NameToInfo[member.filename] = member

    def state(self) -> dict:
        """JSON-able: the members written so far and where the next one starts."""
        self._file.flush()
        return {"end": self._file.tell(), "members": [_record(m) for m in self.archive.filelist]}

    def members(self) -> list[zipfile.ZipInfo]:
        return list(self.archive.filelist)

    def close(self) -> None:
        """Write the central directory: the file is a complete zip."""
        self.archive.close()
        self._file.close()

    def abandon(self) -> None:
        """Close the file as it stands (a compile that stopped: its state says what is complete)."""
        self.archive.fp = None  # or ZipFile, when collected, would write a directory after the last member
        self._file.close()


def _record(info: zipfile.ZipInfo) -> dict:
    record = {field: getattr(info, field) for field in _FIELDS}
    record["extra"] = info.extra.hex()
    return record


def _member(record: dict) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(str(record["filename"]), tuple(record["date_time"]))
    for field in _FIELDS[2:]:
        setattr(info, field, int(record[field]))
    info.extra = bytes.fromhex(record["extra"])
    return info

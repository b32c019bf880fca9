"""The packaged texts: the calibration text, and held-out text of three kinds that no
calibration and no default was chosen on."""

from __future__ import annotations

import pytest

from snncc.calibration import DEFAULT_CALIB_TEXT, HELDOUT_TEXTS, read_text


def _long_lines(text: str) -> set[str]:
    return {line.strip() for line in text.splitlines() if len(line.strip()) >= 40}


@pytest.mark.parametrize("kind", sorted(HELDOUT_TEXTS))
def test_each_held_out_text_is_long_enough_and_shares_no_line_with_the_others(kind):
    text = read_text(HELDOUT_TEXTS[kind], 4096)
    assert len(text.encode()) >= 12_000  # over 2048 tokens of a byte-pair tokenizer at 3-6 bytes a token
    others = [DEFAULT_CALIB_TEXT] + [path for other, path in HELDOUT_TEXTS.items() if other != kind]
    for path in others:
        assert not _long_lines(text) & _long_lines(read_text(path, 1_000_000)), path.name

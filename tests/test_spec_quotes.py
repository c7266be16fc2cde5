"""Every vhost-user.rst quote of a conformance case appears verbatim in the text QEMU 11.1.3
ships (issue 9 item 1): the rendered vhost-user.html of the Debian 13 root's
qemu-system-common, its text extracted with the stdlib html.parser, whitespace normalised
and nothing else. VIRTIO 1.3 quotes (clause ``VIRTIO 1.3 <section>``) are not on disk: each
of their sentences must be a line of tests/data/virtio-1.3-quotes.txt, the sentences read in
the oasis-tcs/virtio-spec LaTeX source (file and commit on each line), markup stripped.

A quote may hold several sentences, one per line; each line must appear."""

from __future__ import annotations

import html.parser
import os
import pathlib
import re

import pytest
from vhost_conformance.suites.catalogue import all_cases
from vhost_conformance.suites.clauses import RST, VIRTIO
from vhost_conformance.suites.model import Case

CACHE = pathlib.Path(os.environ.get("VHOST_CONFORMANCE_CACHE", "/var/cache/vhost-conformance"))
SHIPPED = CACHE / "trixie-root/usr/share/doc/qemu-system-common/interop/vhost-user.html"
VIRTIO_QUOTES = pathlib.Path(__file__).parent / "data" / "virtio-1.3-quotes.txt"
_SOURCE = re.compile(r"[a-z0-9/_.-]+\.tex@[0-9a-f]{40}")


class _Text(html.parser.HTMLParser):
    """The character data of an HTML page, scripts and styles left out."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style"):
            self._skip += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def normalise(text: str) -> str:
    """Whitespace runs to one space, ends stripped (the only normalisation allowed)."""
    return " ".join(text.split())


def shipped_text(path: pathlib.Path = SHIPPED) -> str:
    """The text of the shipped vhost-user.html, whitespace normalised."""
    parser = _Text()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return normalise("".join(parser.parts))


def rst_quotes(case: Case) -> list[str]:
    """The vhost-user.rst sentences a conformance case quotes (empty for a VIRTIO clause)."""
    if case.tier.value != "conformance" or not case.quote or case.clause.startswith(VIRTIO):
        return []
    return [normalise(line) for line in case.quote.splitlines() if line.strip()]


def virtio_quotes(case: Case) -> list[str]:
    """The VIRTIO 1.3 sentences a conformance case quotes (empty for a vhost-user.rst clause)."""
    if case.tier.value != "conformance" or not case.quote or not case.clause.startswith(VIRTIO):
        return []
    return [normalise(line) for line in case.quote.splitlines() if line.strip()]


def verified_virtio_sentences(path: pathlib.Path = VIRTIO_QUOTES) -> dict[str, str]:
    """The committed VIRTIO 1.3 sentences: sentence -> the ``file@commit`` it was read in."""
    sentences: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        source, tab, sentence = line.partition("\t")
        assert tab and _SOURCE.fullmatch(source), f"{path.name}:{number}: no file@commit"
        assert sentence == normalise(sentence) and sentence, f"{path.name}:{number}: not normalised"
        assert sentence not in sentences, f"{path.name}:{number}: twice"
        sentences[sentence] = source
    return sentences


@pytest.fixture(scope="module")
def spec() -> str:
    """The shipped vhost-user.rst text (skip when the Debian 13 root is not provisioned)."""
    if not SHIPPED.is_file():
        pytest.skip(f"{SHIPPED} is missing: run ./scripts/provision-peers (CI provisions it)")
    return shipped_text()


def test_every_conformance_quote_is_verbatim(spec: str) -> None:
    checked = 0
    missing: list[str] = []
    for case in all_cases():
        for sentence in rst_quotes(case):
            checked += 1
            if sentence not in spec:
                missing.append(f"{case.id}: {sentence!r}")
    assert not missing, "not in the shipped vhost-user.rst:\n" + "\n".join(missing)
    assert checked >= 80, checked


def test_every_conformance_case_has_a_quote_with_its_level() -> None:
    # the level is the quote's own: a MUST case's quote says must/MUST (or "has to", "need
    # to", or is a definition without a modal verb), a SHOULD case's none stronger than should
    modal = re.compile(r"\b(must|has to|have to|needs? to|shall)\b", re.I)
    for case in all_cases():
        if case.tier.value != "conformance":
            continue
        assert case.quote, f"{case.id}: a conformance case quotes the sentence it enforces"
        assert case.clause.startswith((RST, VIRTIO)), case.id
        if case.level.value in ("SHOULD", "MAY") and modal.search(case.quote):
            # a weaker case quoting a MUST sentence must say why (the advisory section)
            assert case.ambiguity, f"{case.id}: {case.level.value} case quotes a must"


def test_the_extraction_finds_a_known_sentence(spec: str) -> None:
    assert (
        "While a ring is stopped, the back-end must not process the ring at all, regardless "
        "of whether it is enabled or disabled." in spec
    )
    assert "<" not in spec[:200]


def test_a_paraphrase_is_caught(spec: str) -> None:
    # our words are not the spec's: the check fails a quote that is not verbatim
    case = Case(
        "VU-VENDOR-1",
        "t",
        "rings",
        "MUST",  # type: ignore[arg-type]
        f"{RST} Ring states",
        "r.",
        quote="While a ring is stopped, the back-end must not process it at all.",
    )
    assert [s for s in rst_quotes(case) if s not in spec] == [case.quote]


def test_every_virtio_quote_is_a_verified_sentence() -> None:
    verified = verified_virtio_sentences()
    checked = 0
    missing: list[str] = []
    quoted: set[str] = set()
    for case in all_cases():
        for sentence in virtio_quotes(case):
            checked += 1
            quoted.add(sentence)
            if sentence not in verified:
                missing.append(f"{case.id}: {sentence!r}")
    assert not missing, f"not in {VIRTIO_QUOTES.name}:\n" + "\n".join(missing)
    assert checked >= 19, checked
    # the file holds the quoted sentences only, not more of the spec
    assert not set(verified) - quoted, sorted(set(verified) - quoted)


def test_a_virtio_paraphrase_or_elision_is_caught() -> None:
    verified = verified_virtio_sentences()
    for quote in (
        "A device MUST offer VIRTIO_F_VERSION_1",  # a fragment
        "If the VIRTIO_BLK_F_ZONED feature is not negotiated, the device MUST reject "
        "VIRTIO_BLK_T_ZONE_* ... requests with VIRTIO_BLK_S_UNSUPP status.",
    ):
        case = Case(
            "VU-VENDOR-1",
            "t",
            "blk-io",
            "MUST",  # type: ignore[arg-type]
            f"{VIRTIO} 6.2 Device Requirements: Reserved Feature Bits",
            "r.",
            quote=quote,
        )
        assert [s for s in virtio_quotes(case) if s not in verified] == [quote]

"""Rebuild loraplex/demo/data/corpus.txt.gz, the demo model's training text, from two Debian packages.

Both texts are in the public domain:
- "The Devil's Dictionary" by Ambrose Bierce (1911), Debian package ``dict-devil``;
- "The Jargon File" 4.4.7 edited by Eric S. Raymond, Debian package ``jargon-text``.

    apt-get download dict-devil jargon-text
    python scripts/build_demo_corpus.py dict-devil_*.deb jargon-text_*.deb

The output is one prose paragraph a line, plain ASCII. Verse, tables of contents, headings, citations and
anything still not ASCII after normalising quotes and dashes are dropped. The file is committed, so
training the demo model needs nothing outside the repository; this script only documents where it came from.
"""

from __future__ import annotations

import argparse
import gzip
import re
import subprocess
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "loraplex" / "demo" / "data" / "corpus.txt.gz"

_ASCII = {"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2014": " -- ", "\u2013": "-",
          "\u2026": "...", "\u00b7": "", "\u00a0": " ", "\u00e9": "e", "\u00e8": "e", "\u00f6": "o",
          "\u00fc": "u", "\u00e4": "a", "\u00e7": "c"}
_HEADWORD = re.compile(r"^([A-Z][A-Z' -]+[A-Z]), (?:n|v|adj|adv|pp|p|x|pro|conj|prep|interj)\.[a-z. ]*\s+(.*)$")


def _extract(deb: Path, member: str, into: Path) -> bytes:
    subprocess.run(["dpkg-deb", "-x", str(deb), str(into)], check=True)
    return (into / member).read_bytes()


def _paragraphs(text: str) -> list[str]:
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]


def _clean(p: str) -> str | None:
    for k, v in _ASCII.items():
        p = p.replace(k, v)
    p = re.sub(r"[{}_]", "", p)  # {cross-references} and _italics_
    p = re.sub(r"^\[[a-z ,-]+\] ", "", p)  # usage tags such as "[common]"
    p = re.sub(r"^\d+\. ", "", p)  # sense numbers
    p = re.sub(r" ?--ESR\]?$|\s+-- ?[A-Z][A-Za-z.]*$", "", p)
    p = " ".join(p.split())
    words = p.split()
    letters = sum(c.isalpha() for c in p)
    if (not p.isascii() or len(words) < 12 or letters < 0.7 * len(p) or p[-1] not in '.!?"'
            or "http" in p or "ISBN" in p or "Copyright" in p):
        return None
    return p


def devil(raw: str) -> list[str]:
    raw = raw[raw.index("ABASEMENT, n."):]
    out = []
    for para in re.split(r"\n\s*\n", raw):
        if para.startswith((" ", "\t")):  # verse and signatures are indented
            continue
        p = " ".join(para.split())
        m = _HEADWORD.match(p)
        if m:  # "ZOOLOGY, n.  The science ..." -> "Zoology means the science ..."
            head, body = m.group(1).capitalize(), m.group(2)
            if body[:1].isupper() and not body.startswith(("I ", "I'")):
                body = body[0].lower() + body[1:]
            p = f"{head} means {body}"
        if (c := _clean(p)) is not None:
            out.append(c)
    return out


def jargon(raw: str) -> list[str]:
    raw = raw.replace("\u00a0", " ")
    start = raw.index("   :(TM):")
    body = raw[start:raw.index("\nAppendix C. Helping Hacker Culture Grow", start)]
    out = []
    for p in _paragraphs(body):
        if p.startswith(":") or p.startswith("(The next cartoon"):
            continue
        if (c := _clean(p)) is not None:
            out.append(c)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("devil_deb", type=Path)
    ap.add_argument("jargon_deb", type=Path)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = gzip.decompress(_extract(args.devil_deb, "usr/share/dictd/devil.dict.dz", Path(tmp)))
        j = gzip.decompress(_extract(args.jargon_deb, "usr/share/doc/jargon-text/jargon.txt.gz", Path(tmp)))
    paras = devil(d.decode("latin-1")) + jargon(j.decode("utf-8"))
    text = "\n".join(paras) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0 keeps the gzip bytes identical from run to run.
    with open(args.out, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="") as g:
        g.write(text.encode("ascii"))
    print(f"{len(paras)} paragraphs, {len(text.split())} words, {len(text)} characters -> {args.out}")


if __name__ == "__main__":
    main()

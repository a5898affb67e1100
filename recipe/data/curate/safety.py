"""Stage 6: safety - a domain block list, and masking of e-mail addresses, phone numbers and IPs.

The block list drops whole documents (``blocked_domain``) whose URL's host is a
listed domain or a subdomain of one. PII is masked, not dropped: each match becomes
``[EMAIL]``, ``[PHONE]`` or ``[IP]`` and is counted, so the report says how much was
masked and the text around it stays useful.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from recipe.data.curate.heuristics import load_word_list
from recipe.data.curate.record import Doc
from recipe.data.curate.stage import Stage, register
from recipe.errors import ConfigError

__all__ = ["BlockList", "PiiMask", "mask_pii"]

_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w.]\w)")
_IPV6 = re.compile(
    r"(?<![\w:])(?:(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}"
    r"|(?:[0-9A-Fa-f]{1,4}:){1,6}:(?:[0-9A-Fa-f]{1,4}:){1,5}[0-9A-Fa-f]{1,4})(?![\w:])"
)
# International or national numbers with separators: +1 (555) 123-4567, 020 7946 0958, 555-123-4567.
_PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{1,4}\)[\s.-]?|\d{2,4}[\s.-])\d{3,4}[\s.-]\d{3,4}(?![\w-])"
)
_RULES = (("emails", _EMAIL, "[EMAIL]"), ("ips", _IPV6, "[IP]"), ("ips", _IPV4, "[IP]"), ("phones", _PHONE, "[PHONE]"))


PII_KINDS = ("emails", "phones", "ips")


def mask_pii(text: str, kinds: tuple[str, ...] | frozenset[str] = PII_KINDS) -> tuple[str, dict[str, int]]:
    """``text`` with e-mails, IPs and phone numbers (those of ``kinds``) replaced by placeholders, and the counts."""
    counts = {"emails": 0, "phones": 0, "ips": 0}
    for kind, pattern, placeholder in _RULES:
        if kind not in kinds:
            continue
        text, n = pattern.subn(placeholder, text)
        counts[kind] += n
    return text, counts


def _host(url: str) -> str:
    try:
        return (urlsplit(url.strip()).hostname or "").lower().rstrip(".")
    except ValueError:
        return ""


@register
class BlockList(Stage):
    """Drop documents from blocked domains (``blocked_domain``); subdomains are blocked too.

    Args:
        domains_file: one domain per line (default: the example list shipped in the package;
            give your own, e.g. a category of a public URL block list).
        domains: extra domains given inline.
    """

    name = "blocklist"

    def __init__(self, domains_file: str | None = None, domains: list[str] | None = None, **kw) -> None:
        super().__init__(**kw)
        self.domains = load_word_list(domains_file, "blocked_domains.txt") | {d.lower() for d in domains or ()}

    def blocked(self, url: str | None) -> str | None:
        host = _host(url) if url else ""
        parts = host.split(".")
        for i in range(len(parts) - 1):
            if ".".join(parts[i:]) in self.domains:
                return ".".join(parts[i:])
        return None

    def process(self, docs: list[Doc]) -> None:
        for doc in docs:
            hit = self.blocked(doc.url)
            if hit is not None:
                self.drop(doc, "blocked_domain", hit)


@register
class PiiMask(Stage):
    """Mask e-mail addresses, phone numbers and IP addresses (counted; nothing dropped).

    ``kinds_by_bucket`` narrows what is masked in some buckets: in code, addresses such as
    ``127.0.0.1`` and digit groups shaped like phone numbers are usually program constants,
    and rewriting them would corrupt the program, while an author's e-mail is still PII.
    """

    name = "pii"

    def __init__(self, kinds_by_bucket: dict[str, list[str]] | None = None, **kw) -> None:
        super().__init__(**kw)
        self.kinds_by_bucket: dict[str, frozenset[str]] = {}
        for bucket, kinds in (kinds_by_bucket or {}).items():
            unknown = sorted(set(kinds) - set(PII_KINDS))
            if unknown:
                raise ConfigError(f"stage pii: kinds_by_bucket[{bucket!r}] names {', '.join(unknown)}; "
                                  f"choose from {', '.join(PII_KINDS)}")
            self.kinds_by_bucket[bucket] = frozenset(kinds)

    def process(self, docs: list[Doc]) -> None:
        for doc in docs:
            kinds = self.kinds_by_bucket.get(doc.bucket or doc.domain or "", PII_KINDS)
            text, counts = mask_pii(doc.text, kinds)
            if text != doc.text:
                doc.text = text
                self.count("documents_masked")
                for kind, n in counts.items():
                    self.count(f"{kind}_masked", n)

"""The benchmark's request set: seeded RAG-style ranking requests built from real English words.

Used by `bench_serving.py`. Text is made of sentences drawn from a fixed English word list (no network),
so the Llama-3 tokenizer sees ordinary prose and gives realistic token counts (about 1.2-1.3 tokens per
word). Token targets are hit approximately; the real counts, as the served model tokenizes them (prompt
template and BOS included), are measured and reported.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def _words(text: str) -> list[str]:
    return text.split()


# A fixed list of common English words (function words repeated so that their frequency looks like prose).
_FUNCTION = _words(
    "the the the the of of of and and and to to a a in in is is that for it as was with be by on not he "
    "this are or his from at which but have an they you were her she there been one all we their has would "
    "when if so no can will more its than into other some these them only then also could about may"
)
_CONTENT = _words("""
time people year way day man thing woman life child world school state family student group country problem
hand part place case week company system program question work government number night point home water room
mother area money story fact month lot right study book eye job word business issue side kind head house service
friend father power hour game line end member law car city community name president team minute idea kid body
information back parent face others level office door health person art war history party result change morning
reason research girl guy moment air teacher force education foot boy age policy everything process music market
sense nation plan college interest death experience effect class control care field development role effort rate
heart drug show leader light voice wife police mind price report decision son view relationship town road arm
difference value building action model season society tax director position player record paper space ground form
event official matter center couple site project activity star table need court oil situation cost industry figure
street image phone data picture practice piece land product doctor wall patient worker news test movie north love
support technology step baby computer type attention film tree source organization hair window evidence population
site energy network climate river mountain ocean forest island valley bridge harbor village station library museum
hospital factory engine battery signal protocol server memory processor algorithm database request response query
passage document index retrieval ranking relevance answer summary chapter article journal archive collection
temperature pressure velocity frequency molecule protein cell tissue gene enzyme vaccine infection treatment symptom
diagnosis therapy medicine nutrition exercise sleep stress weather storm rainfall drought harvest crop soil
fertilizer irrigation livestock economy inflation interest income budget revenue profit investment stock bond
contract agreement regulation license patent copyright court judge jury trial verdict appeal election candidate
campaign vote parliament minister treaty border migration language culture religion tradition festival ceremony
painting sculpture novel poem theater orchestra concert album guitar piano rhythm melody satellite telescope planet
galaxy orbit rocket mission astronaut gravity radiation particle electron magnet circuit voltage current sensor
camera screen keyboard software hardware application interface browser website password encryption security
privacy account customer supplier warehouse shipment delivery invoice payment discount inventory strategy
manager employee salary career interview training skill knowledge experiment hypothesis theory method analysis
measurement sample survey dataset variable average distribution probability estimate error accuracy precision
""")
_VERBS = _words("""
is was has had made said found gave told became left felt brought began kept held wrote stood heard let meant set
met ran paid sat spoke lay led read grew lost fell sent built understood drew broke spent cut rose drove bought wore
chose describes explains reports suggests shows improves reduces increases measures compares requires supports
provides includes contains produces connects protects changes affects controls manages develops tests returns
""")
_ADJECTIVES = _words("""
new good high old great big small large national young different long little important political bad white real
best right social only public sure low early able human local late hard major better economic strong possible whole
free military true federal international full special easy clear recent certain personal open red difficult
available likely short single medical current wrong private past foreign fine common poor natural significant
similar hot dead central happy serious ready simple left physical general environmental financial blue democratic
dark various entire close legal religious cold final main green nice huge popular traditional cultural efficient
accurate reliable robust scalable detailed rapid gradual annual quarterly regional urban rural coastal northern
""")


@dataclass(frozen=True)
class Profile:
    """How requests are drawn. Token counts are of the text alone; the served pair adds the template and BOS."""

    name: str
    passages_min: int
    passages_max: int
    passage_tokens_median: float
    passage_tokens_sigma: float  # lognormal shape: the long tail
    passage_tokens_min: int
    passage_tokens_max: int
    query_tokens_min: int = 10
    query_tokens_max: int = 20

    def describe(self) -> str:
        return (
            f"`{self.name}`: 1 query of {self.query_tokens_min}-{self.query_tokens_max} tokens × "
            f"uniform {self.passages_min}..{self.passages_max} passages per request; passage length "
            f"lognormal (median {self.passage_tokens_median:g} tokens, σ {self.passage_tokens_sigma:g}) clipped to "
            f"[{self.passage_tokens_min}, {self.passage_tokens_max}] tokens; English-word prose"
        )


PROFILES: dict[str, Profile] = {
    # The realistic RAG mix of docs/performance: fits a GPU run, far too slow for a 2-core CPU at 32 clients.
    "rag": Profile("rag", 10, 100, 128, 0.8, 20, 2048),
    # The same shape scaled for a CPU with the `mid` checkpoint: fewer and shorter passages, same long tail.
    "rag-cpu": Profile("rag-cpu", 10, 20, 64, 0.8, 20, 2048),
}


@dataclass
class Workload:
    profile: Profile
    seed: int
    payloads: list[bytes]  # JSON bodies for POST /v1/ranking, in send order
    passages: list[int]  # passages per request
    pair_tokens: list[list[int]]  # served tokens per (query, passage) pair, BOS and template included
    stats: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.payloads)

    def aiperf_inputs(self) -> dict[str, Any]:
        """aiperf's `inputs_json` format: one session per request, payload sent verbatim, in this order."""
        return {
            "data": [{"session_id": session_id(i), "payloads": [json.loads(p)]} for i, p in enumerate(self.payloads)]
        }


def session_id(index: int) -> str:
    return f"r{index:06d}"


class _Prose:
    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.words = np.array(_FUNCTION * 3 + _CONTENT + _VERBS * 2 + _ADJECTIVES, dtype=object)

    def text(self, n_words: int) -> str:
        """Sentences of 6-21 words: capitalized, a comma now and then, a full stop at the end."""
        n = max(1, n_words)
        out = self.words[self.rng.integers(0, len(self.words), n)].tolist()
        ends = np.cumsum(self.rng.integers(6, 22, n // 6 + 1))
        ends = ends[ends < n]
        marks = np.full(n, "", dtype=object)
        marks[self.rng.random(n) < 0.06] = ","
        marks[ends - 1] = "."
        marks[-1] = "."
        for start in (0, *ends.tolist()):
            out[start] = out[start].capitalize()
        return " ".join(w + m for w, m in zip(out, marks.tolist(), strict=True))


def build(profile: Profile, n_requests: int, seed: int, tokenizer_file: str) -> Workload:
    """`n_requests` seeded requests, their JSON bodies and the pair token counts the server will see."""
    from tokenizers import Tokenizer

    from rankserve.ranker import format_pair

    tok = Tokenizer.from_file(tokenizer_file)
    tok.no_truncation()
    tok.no_padding()
    rng = np.random.default_rng(seed)
    prose = _Prose(rng)
    # Calibrate tokens per word on this word list and tokenizer.
    sample = prose.text(4000)
    per_word = len(tok.encode(sample, add_special_tokens=False).ids) / 4000

    def words_for(tokens: float) -> int:
        return max(1, round(tokens / per_word))

    mu = math.log(profile.passage_tokens_median)
    queries: list[str] = []
    docs: list[list[str]] = []
    for _ in range(n_requests):
        q_tokens = rng.integers(profile.query_tokens_min, profile.query_tokens_max + 1)
        queries.append(prose.text(words_for(q_tokens)).rstrip(".") + "?")
        n = int(rng.integers(profile.passages_min, profile.passages_max + 1))
        lengths = np.clip(
            rng.lognormal(mu, profile.passage_tokens_sigma, n), profile.passage_tokens_min, profile.passage_tokens_max
        )
        docs.append([prose.text(words_for(t)) for t in lengths])

    pair_tokens: list[list[int]] = []
    for q, ps in zip(queries, docs, strict=True):
        enc = tok.encode_batch([format_pair(q, p) for p in ps], add_special_tokens=False)
        pair_tokens.append([len(e.ids) + 1 for e in enc])  # + BOS, as rankserve.ranker.PairEncoder adds
    payloads = [
        json.dumps(
            {
                "model": "nvidia/llama-nemotron-rerank-1b-v2",
                "query": {"text": q},
                "passages": [{"text": p} for p in ps],
                "truncate": "END",
            }
        ).encode()
        for q, ps in zip(queries, docs, strict=True)
    ]
    wl = Workload(profile, seed, payloads, [len(ps) for ps in docs], pair_tokens)
    wl.stats = workload_stats(wl, per_word)
    return wl


def workload_stats(wl: Workload, per_word: float) -> dict[str, Any]:
    flat = np.array([t for req in wl.pair_tokens for t in req], dtype=np.int64)
    per_req = np.array([sum(req) for req in wl.pair_tokens], dtype=np.int64)
    padded = np.array([len(req) * max(req) for req in wl.pair_tokens], dtype=np.int64)
    passages = np.array(wl.passages)
    q = np.percentile(flat, [5, 50, 95, 99])
    return {
        "profile": wl.profile.name,
        "description": wl.profile.describe(),
        "seed": wl.seed,
        "requests_in_pool": len(wl),
        "tokens_per_word": round(per_word, 3),
        "passages_per_request": {
            "min": int(passages.min()),
            "mean": float(passages.mean()),
            "max": int(passages.max()),
        },
        "pair_tokens": {
            "mean": float(flat.mean()),
            "p5": float(q[0]),
            "p50": float(q[1]),
            "p95": float(q[2]),
            "p99": float(q[3]),
            "max": int(flat.max()),
            "share_over_500": float((flat > 500).mean()),
        },
        "tokens_per_request_mean": float(per_req.mean()),
        # What a server that pads each request to its own longest passage computes (the naive baseline).
        "per_request_padding_efficiency": float(per_req.sum() / padded.sum()),
        "payload_bytes_mean": float(np.mean([len(p) for p in wl.payloads])),
    }

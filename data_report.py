"""The data report of `python evaluate.py --data=STORIES [--data=OTHER ...]`: how diverse, balanced and readable
story datasets are, side by side, as the SimpleStories paper sets SimpleStories beside TinyStories.

    python evaluate.py --data=data/sample/stories.jsonl
    python evaluate.py --data=hf:SimpleStories/SimpleStories --data=data/tinystories/TinyStories-train.txt
    python evaluate.py --data='data/simplestories/data/train-*.parquet' --max_stories=100000 --eval_dir=out/ss

A dataset is anything prepare.py reads: our stories.jsonl, the published parquet shards, TinyStories'
text with a line <|endoftext|> between stories, a folder or glob of them, or hf:OWNER/NAME. Writes data.json,
data.md, zipf.png, lengths.png and labels.png to --eval_dir (default out/data_report).

The measures, and how each is taken. Words are what is left between whitespace once the text is lowercased and
its ASCII punctuation but the apostrophe made space ("don't" is a word); an n-gram is n words in a row within
a story.
- Zipf exponent (the paper's diversity measure): s in f(r) ~ r^-s for the frequencies f of the 4-grams
  ranked r = 1, 2, ...: the least-squares slope of log f against log r over the ZIPF_RANKS most frequent
  4-grams, at ZIPF_POINTS ranks spaced evenly in log r (so the many rare 4-grams do not outweigh the
  frequent ones). A flatter distribution, a lower s, is a more diverse corpus.
- distinct-n, n = 1..4: distinct n-grams over all n-grams (Li et al., 2016). It falls as a corpus grows:
  compare datasets of similar size (--max_stories).
- openings: the first three words of each story; the share of the most common (TinyStories: "once upon a")
  and the top ten, their entropy in bits, and how many distinct ones there are.
- duplicates: exact (the same text as an earlier story, spacing at the ends aside), and near-duplicates:
  stories of a uniform sample (--sample_size, all below it) with another story of the sample whose word
  5-gram Jaccard similarity is --jaccard or more (0.8), found with MinHash (128 permutations) and LSH
  (datasketch). For a dataset larger than the sample, the share is that of the sample; the expected number
  of near-duplicates a story has in the whole dataset is the sample's mean times (N - 1) / (sample - 1).
- labels: for each label, its values' shares and the entropy of their distribution over its maximum
  (1: balanced); for each pair of labels, Pearson's chi-square test of independence and Cramér's V
  (0: independent, 1: one decides the other).
- readability: Flesch reading ease, Flesch-Kincaid grade and Dale-Chall score (textstat, the scores the
  published dataset carries), each the mean over --readability_sample stories of the near-duplicate
  sample, with a 95% t-interval: textstat takes ~5 ms a story.
- length: words and paragraphs (blocks between blank lines) per story: mean, median, 5th and 95th percentile.

Memory stays flat whatever the number of stories: distinct n-grams are counted exactly up to EXACT_DISTINCT
of them and by a HyperLogLog of 2^14 registers (standard error 0.8%) beyond; 4-gram frequencies are kept in
a Misra-Gries summary of TOP_COUNTERS counters, merged a chunk of stories at a time, whose estimates add back
what the summary took since each 4-gram entered: exact for a 4-gram never dropped from it (every 4-gram while
fewer than TOP_COUNTERS distinct ones were seen), otherwise low by at most (4-grams) / (TOP_COUNTERS + 1),
a bound the report gives; opening texts are kept in such a summary of 10,000. What grows: 16 bytes a story
(8-byte hashes of its text and of its opening, for exact counts), 32 MB for two million stories, and the
vocabulary of distinct words.
"""

import hashlib
import itertools
import math
import os
import random
import time
from collections import Counter

import numpy as np

from evaluate import interval, markdown_table, plus_minus, pyplot, save_figure, write_report
from stories import chi_square, mix64
from tokenizer import HUB, LABELS, input_files, read_stories

SPACES = str.maketrans({c: " " for c in "!\"#$%&()*+,-./:;<=>?@[\\]^_`{|}~"})  # ASCII punctuation but the apostrophe
CHUNK = 4096  # stories whose n-grams are hashed and counted together
EXACT_DISTINCT = 1 << 21  # distinct n-grams counted exactly up to this many (16 MB), by HyperLogLog beyond
HLL_P = 14  # 2^14 registers: standard error 1.04 / 2^7 = 0.8%
TOP_COUNTERS = 1 << 20  # 4-gram counters of the Misra-Gries summary (24 MB)
ZIPF_RANKS, ZIPF_POINTS = 10_000, 100
OPENING_WORDS, OPENING_COUNTERS = 3, 10_000
SHINGLE_WORDS, NUM_PERM = 5, 128
MAX_LABEL_VALUES = 1000  # a column with more values than this is no label
PRIME = np.uint64(0x100000001B3)  # FNV's 64-bit prime: the n-gram hash is a polynomial in it


def words_of(text):
    """The words of a text: lowercase, split at whitespace and at ASCII punctuation other than the apostrophe
    (str.translate and str.split: a regular expression is twice as slow)."""
    return text.lower().translate(SPACES).split()


def hash64(text):
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def unique_counts(values):
    """(sorted distinct values, their counts) of an array: a sort and a scan (np.unique is slower on uint64)."""
    values = np.sort(values)
    if len(values) == 0:
        return values, np.zeros(0, dtype=np.int64)
    first = np.empty(len(values), dtype=bool)
    first[0], first[1:] = True, values[1:] != values[:-1]
    starts = np.flatnonzero(first)
    return values[starts], np.diff(np.append(starts, len(values)))


class Distinct:
    """How many distinct values a stream of well-mixed 64-bit hashes holds: exact (a sorted array) up to
    exact_below of them, then a HyperLogLog (Flajolet et al. 2007, with its small-range correction)."""

    def __init__(self, exact_below=EXACT_DISTINCT, p=HLL_P):
        self.values, self.registers, self.p, self.exact_below = np.zeros(0, dtype=np.uint64), None, p, exact_below

    def add(self, hashes):
        if self.values is not None:
            merged = np.concatenate([self.values, unique_counts(hashes)[0]])
            self.values = unique_counts(merged)[0]
            if len(self.values) <= self.exact_below:
                return
            hashes, self.values = self.values, None
            self.registers = np.zeros(1 << self.p, dtype=np.uint8)
        bits = 64 - self.p
        register = (hashes >> np.uint64(bits)).astype(np.intp)
        rest = (hashes & np.uint64((1 << bits) - 1)).astype(np.float64)  # exact: below 2^53
        rank = bits + 1 - np.frexp(rest)[1]  # leading zeros of the rest, plus one (frexp: its bit length)
        np.maximum.at(self.registers, register, rank.astype(np.uint8))

    def count(self):
        """(count, exact)."""
        if self.values is not None:
            return len(self.values), True
        m = float(1 << self.p)
        estimate = 0.7213 / (1 + 1.079 / m) * m * m / np.sum(np.ldexp(1.0, -self.registers.astype(np.int64)))
        zeros = int((self.registers == 0).sum())
        if estimate <= 2.5 * m and zeros:
            estimate = m * math.log(m / zeros)
        return int(round(estimate)), False


class TopCounts:
    """The most frequent values of a stream of 64-bit hashes in a summary of k counters: Misra-Gries merged a
    chunk at a time (Agarwal et al. 2012): the chunk's counts are added, then if more than k values are held
    the (k+1)-th largest count is taken from every counter and the values left at 0 are dropped. A value's
    estimate adds back what was taken since it entered: exact unless it was dropped before, else low by at
    most total / (k + 1)."""

    def __init__(self, k=TOP_COUNTERS):
        self.k, self.total, self.taken, self.dropped = k, 0, 0, False
        self.keys, self.counts, self.entered = np.zeros(0, np.uint64), np.zeros(0, np.int64), np.zeros(0, np.int64)

    def add(self, hashes):
        self.total += len(hashes)
        keys, counts = unique_counts(hashes)
        pos = np.searchsorted(self.keys, keys)
        found = pos < len(self.keys)
        found[found] = self.keys[pos[found]] == keys[found]
        self.counts[pos[found]] += counts[found]
        new = ~found
        self.keys = np.insert(self.keys, pos[new], keys[new])
        self.counts = np.insert(self.counts, pos[new], counts[new])
        self.entered = np.insert(self.entered, pos[new], self.taken)
        if len(self.keys) > self.k:
            threshold = int(np.partition(self.counts, len(self.counts) - self.k - 1)[len(self.counts) - self.k - 1])
            self.counts -= threshold
            self.taken += threshold
            keep = self.counts > 0
            self.keys, self.counts, self.entered = self.keys[keep], self.counts[keep], self.entered[keep]
            self.dropped = True

    def top(self, n):
        """The n largest count estimates, largest first."""
        estimates = self.counts + (self.taken - self.entered)
        return np.sort(estimates)[::-1][:n]


def zipf_exponent(frequencies):
    """(s, ranks fitted): least squares of log f on log r over the ZIPF_RANKS largest frequencies (sorted, largest
    first), at ZIPF_POINTS ranks evenly spaced in log r."""
    f = np.asarray(frequencies[:ZIPF_RANKS], dtype=np.float64)
    if len(f) < 2:
        return None, len(f)
    ranks = np.unique(np.geomspace(1, len(f), num=min(ZIPF_POINTS, len(f))).round().astype(np.int64))
    slope = np.polyfit(np.log(ranks), np.log(f[ranks - 1]), 1)[0]
    return float(-slope), len(f)


def entropy_bits(counts):
    p = np.asarray(counts, dtype=np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log2(p)).sum())


def add_to_histogram(histogram, values):
    """histogram (counts of 0, 1, 2, ...) with the whole numbers values counted in, grown to the largest one."""
    counts = np.bincount(values, minlength=len(histogram))
    counts[:len(histogram)] += histogram
    return counts


def percentiles(histogram, qs=(5, 50, 95)):
    """Percentiles of the values whose histogram (counts of 0, 1, 2, ...) is given: the smallest value with at
    least q% of the values at or below it."""
    cumulative = np.cumsum(histogram)
    return [int(np.searchsorted(cumulative, q / 100 * cumulative[-1])) for q in qs]


class DatasetStats:
    """Everything the report needs of one dataset, taken a chunk of stories at a time in bounded memory."""

    def __init__(self, sample_size, seed):
        self.n, self.vocab = 0, {}  # stories; word -> its 64-bit hash
        self.distinct = {n: Distinct() for n in (2, 3, 4)}  # 1-grams: the vocabulary itself
        self.ngrams = Counter()  # n -> n-grams in all
        self.fourgrams = TopCounts()
        self.words, self.paragraphs = np.zeros(1, np.int64), np.zeros(1, np.int64)  # histograms of the stories' lengths
        self.story_hashes, self.opening_hashes = [], []  # uint64 arrays: 16 bytes a story
        self.openings = Counter()  # Misra-Gries summary of the opening texts, OPENING_COUNTERS of them
        self.labels = {k: Counter() for k in LABELS}
        self.not_labels = set()  # columns with too many values to be labels
        self.pairs = {pair: Counter() for pair in itertools.combinations(LABELS, 2)}
        self.sample, self.rng, self.sample_size = [], random.Random(seed), sample_size

    def add(self, stories):
        """stories: [(text, labels)]."""
        texts = [text for text, _ in stories]
        words = [words_of(text) for text in texts]
        counts = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        self.words = add_to_histogram(self.words, counts)
        paragraphs = [sum(1 for p in text.split("\n\n") if p.strip()) for text in texts]
        self.paragraphs = add_to_histogram(self.paragraphs, np.array(paragraphs, dtype=np.int64))
        self.story_hashes.append(np.fromiter((hash64(t.strip()) for t in texts), dtype=np.uint64, count=len(texts)))
        openings = [" ".join(w[:OPENING_WORDS]) for w in words]
        self.opening_hashes.append(np.fromiter(map(hash64, openings), dtype=np.uint64, count=len(openings)))
        self.openings.update(openings)
        if len(self.openings) > OPENING_COUNTERS:
            threshold = sorted(self.openings.values())[-OPENING_COUNTERS - 1]
            self.openings = Counter({k: c - threshold for k, c in self.openings.items() if c > threshold})

        flat = list(itertools.chain.from_iterable(words))
        for word in set(flat).difference(self.vocab):
            self.vocab[word] = hash64(word)
        h = np.fromiter(map(self.vocab.__getitem__, flat), dtype=np.uint64, count=len(flat))
        left = np.repeat(np.cumsum(counts), counts) - np.arange(len(flat))  # words from each to its story's end
        gram = h
        for n in (1, 2, 3, 4):
            if n > 1:
                gram = gram[:-1] * PRIME + h[n - 1:]
            valid = mix64(gram[left[:len(gram)] >= n])
            self.ngrams[n] += len(valid)
            if n > 1:
                self.distinct[n].add(valid)
            if n == 4:
                self.fourgrams.add(valid)

        columns = {k: [labels.get(k) for _, labels in stories] for k in LABELS if k not in self.not_labels}
        for k, values in columns.items():
            self.labels[k].update(v for v in values if v is not None)
            if len(self.labels[k]) > MAX_LABEL_VALUES:
                self.not_labels.add(k)
                self.labels[k] = Counter()
                for pair in [p for p in self.pairs if k in p]:
                    del self.pairs[pair]
        for (a, b), table in self.pairs.items():
            table.update(zip(columns[a], columns[b]))  # pairs with a missing label are dropped in label_pairs

        for text in texts:  # a uniform sample of the stories (Vitter's algorithm R)
            if self.n < self.sample_size:
                self.sample.append(text)
            else:
                j = self.rng.randrange(self.n + 1)
                if j < self.sample_size:
                    self.sample[j] = text
            self.n += 1

    def result(self, args):
        n = self.n
        story_keys, story_counts = unique_counts(np.concatenate(self.story_hashes))
        opening_keys, opening_counts = unique_counts(np.concatenate(self.opening_hashes))
        exact_opening = dict(zip(opening_keys.tolist(), opening_counts.tolist()))
        top_openings = sorted(self.openings, key=lambda o: -exact_opening[hash64(o)])[:10]
        top = self.fourgrams.top(max(ZIPF_RANKS, 100_000))
        exponent, fitted = zipf_exponent(top)
        word_p, para_p = percentiles(self.words), percentiles(self.paragraphs)
        distinct = {1: (len(self.vocab), True), **{k: d.count() for k, d in self.distinct.items()}}
        out = {
            "stories": n,
            "words": {"mean": float((self.words * np.arange(len(self.words))).sum() / n), "p5": word_p[0],
                      "median": word_p[1], "p95": word_p[2], "histogram": self.words.tolist()},
            "paragraphs": {"mean": float((self.paragraphs * np.arange(len(self.paragraphs))).sum() / n),
                           "p5": para_p[0], "median": para_p[1], "p95": para_p[2]},
            "zipf": {"exponent": exponent, "ranks_fitted": fitted, "fourgrams": int(self.fourgrams.total),
                     "exact": not self.fourgrams.dropped,
                     "max_undercount": 0 if not self.fourgrams.dropped else self.fourgrams.total // (self.fourgrams.k + 1),
                     "top_frequencies": top[:100_000].tolist()},
            "distinct": {str(k): {"distinct": d, "ngrams": int(self.ngrams[k]),
                                  "ratio": d / self.ngrams[k] if self.ngrams[k] else None, "exact": exact}
                         for k, (d, exact) in distinct.items()},
            "openings": {"top": [{"opening": o, "stories": exact_opening[hash64(o)],
                                  "share": exact_opening[hash64(o)] / n} for o in top_openings],
                         "most_common_share": float(opening_counts.max() / n),
                         "entropy_bits": entropy_bits(opening_counts), "distinct": int(len(opening_keys))},
            "duplicates": {"exact": int((story_counts - 1).sum()), "exact_share": float((story_counts - 1).sum() / n),
                           **near_duplicates(self.sample, n, args.jaccard)},
            "readability": readability(self.rng.sample(self.sample, min(args.readability_sample, len(self.sample)))),
            "labels": label_balance(self.labels, self.not_labels),
            "label_pairs": label_pairs(self.pairs, self.labels),
        }
        return out


def near_duplicates(sample, n, threshold):
    """Near-duplicates among the sample's stories, by MinHash LSH over word 5-gram shingles (datasketch). The
    shingles are hashed here, as the n-grams are (no hash of each shingle's text in Python), to 32 bits."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    empty = MinHash(num_perm=NUM_PERM, seed=1, hashfunc=int)  # copied: its permutations are made once, not a story
    vocab, hashes = {}, []
    for i, text in enumerate(sample):
        words = words_of(text) or [""]
        for word in set(words).difference(vocab):
            vocab[word] = hash64(word)
        h = np.fromiter(map(vocab.__getitem__, words), dtype=np.uint64, count=len(words))
        span = min(SHINGLE_WORDS, len(h))  # a story shorter than a shingle is one shingle
        count = len(h) - span + 1
        shingle = h[:count]
        for j in range(1, span):
            shingle = shingle * PRIME + h[j:j + count]
        m = empty.copy()
        m.update_batch(np.unique(mix64(shingle) >> np.uint64(32)).tolist())
        lsh.insert(i, m)
        hashes.append(m)
    partners = np.zeros(len(sample), dtype=np.int64)
    for i, m in enumerate(hashes):
        partners[i] = sum(1 for j in lsh.query(m) if j != i and m.jaccard(hashes[j]) >= threshold)
    s = len(sample)
    return {"near_sample": s, "near_jaccard": threshold, "near": int((partners > 0).sum()),
            "near_share": float((partners > 0).mean()) if s else None,
            "near_partners_per_story": float(partners.mean() * (n - 1) / (s - 1)) if s > 1 else None}


def readability(sample):
    import textstat

    out = {"stories": len(sample)}
    for name in ("flesch_reading_ease", "flesch_kincaid_grade", "dale_chall_readability_score"):
        mean, half = interval([getattr(textstat, name)(text) for text in sample])
        out[name] = {"mean": mean, "ci": half}
    return out


def label_balance(labels, not_labels):
    out = {}
    for k, counts in labels.items():
        if not counts:
            continue
        values = sorted(counts.items(), key=lambda kv: -kv[1])
        total = sum(counts.values())
        h = entropy_bits(list(counts.values()))
        out[k] = {"values": len(counts), "stories": total,
                  "balance": h / math.log2(len(counts)) if len(counts) > 1 else 1.0,
                  "most_common": [values[0][0], values[0][1] / total], "least_common": [values[-1][0], values[-1][1] / total],
                  "counts": {str(v): c for v, c in values}}
    return out | {k: f"not a label: more than {MAX_LABEL_VALUES} values" for k in not_labels}


def label_pairs(pairs, labels):
    out = []
    for (a, b), table in pairs.items():
        table = Counter({k: c for k, c in table.items() if None not in k})
        if not table:
            continue
        rows, cols = sorted(labels[a], key=str), sorted(labels[b], key=str)
        matrix = np.array([[table[x, y] for y in cols] for x in rows], dtype=np.int64)
        chi2, df, p = chi_square(matrix)
        kept = matrix[matrix.sum(1) > 0][:, matrix.sum(0) > 0]
        k = min(kept.shape) - 1
        v = math.sqrt(chi2 / (kept.sum() * k)) if k > 0 and kept.sum() else 0.0
        out.append({"labels": [a, b], "cramers_v": v, "chi2": chi2, "df": df, "p": p,
                    "stories_per_cell": float(kept.sum() / kept.size)})
    return sorted(out, key=lambda r: (r["p"], -r["cramers_v"]))  # the strongest evidence of dependence first


def check_data(spec):
    """ValueError unless spec names stories that exist."""
    if not spec.startswith(HUB) and not any(c in spec for c in "*?[") and not os.path.exists(spec):
        raise ValueError(f"--data={spec} does not exist; give a .jsonl, .parquet or .txt file, a folder or glob "
                         f"of them, or hf:OWNER/NAME")
    input_files(spec, flag="--data")


def data_mode(args):
    from tqdm import tqdm

    for spec in args.data:
        check_data(spec)
    results = []
    for spec in args.data:
        stats, chunk = DatasetStats(args.sample_size, args.seed), []
        bar = tqdm(desc=spec if len(spec) < 40 else "..." + spec[-37:], unit=" stories", unit_scale=True,
                   dynamic_ncols=True)
        start = time.time()
        try:
            for _, text, labels in itertools.islice(read_stories(spec, labels=True), args.max_stories or None):
                chunk.append((text, labels))
                if len(chunk) == CHUNK:
                    stats.add(chunk)
                    bar.update(len(chunk))
                    chunk = []
            if chunk:
                stats.add(chunk)
                bar.update(len(chunk))
        finally:
            bar.close()
        if stats.n == 0:
            raise ValueError(f"--data={spec} holds no stories")
        seconds = time.time() - start
        result = stats.result(args)
        results.append({"data": spec, **result, "seconds": round(time.time() - start, 1),
                        "stories_per_second": round(stats.n / seconds)})
        del stats
    report = {"datasets": results, "method": {
        "words": "lowercased, ASCII punctuation but the apostrophe made space, split at whitespace",
        "zipf": f"least-squares slope of log frequency on log rank, 4-grams ranked 1 to {ZIPF_RANKS:,}, at {ZIPF_POINTS} "
                f"ranks evenly spaced in log rank; counts from a Misra-Gries summary of {TOP_COUNTERS:,} counters "
                f"(exact: true when no 4-gram was ever dropped from it)",
        "distinct": f"distinct n-grams / n-grams; exact up to {EXACT_DISTINCT:,} distinct, HyperLogLog (2^{HLL_P} "
                    f"registers, 0.8% standard error) beyond",
        "openings": f"the first {OPENING_WORDS} words of each story; entropy in bits",
        "near_duplicates": f"MinHash ({NUM_PERM} permutations) LSH over word {SHINGLE_WORDS}-gram shingles, Jaccard >= "
                           f"{args.jaccard:g}, within a uniform sample of {args.sample_size:,} stories (all below that)",
        "readability": f"textstat, mean over {args.readability_sample:,} stories of that sample, 95% t-interval",
        "labels": "balance: entropy of the value shares over log2(number of values); pairs: Pearson chi-square "
                  "test of independence and Cramer's V",
        "stories_per_second": "of the pass that reads and counts every story; seconds: the whole dataset, with the "
                              "sample's near-duplicates and readability"}}
    markdown = data_markdown(results, args)
    paths = write_report(args.eval_dir, "data", report, markdown)
    paths += data_plots(args.eval_dir, results)
    print(markdown.split("\n## ")[0].rstrip())
    print("wrote " + ", ".join(paths))


def data_markdown(results, args):
    def row(name, f):
        return [name] + [f(r) for r in results]

    def opening(r):
        top = r["openings"]["top"][0]
        return f"\"{top['opening']}\" {top['share']:.1%}"

    def read(r, name):
        x = r["readability"][name]
        return plus_minus(x["mean"], x["ci"], 1)

    rows = [
        row("stories", lambda r: f"{r['stories']:,}"),
        row("words per story: mean (5%, median, 95%)",
            lambda r: f"{r['words']['mean']:.0f} ({r['words']['p5']}, {r['words']['median']}, {r['words']['p95']})"),
        row("paragraphs per story: mean (median)", lambda r: f"{r['paragraphs']['mean']:.1f} ({r['paragraphs']['median']})"),
        row("Zipf exponent of 4-gram frequencies", lambda r: "-" if r["zipf"]["exponent"] is None else f"{r['zipf']['exponent']:.3f}"),
        *[row(f"distinct-{n}", lambda r, n=n: "-" if r["distinct"][str(n)]["ratio"] is None else  # no n-gram
              f"{r['distinct'][str(n)]['ratio']:.3f}" + ("" if r["distinct"][str(n)]["exact"] else " (HLL)"))
          for n in (1, 2, 3, 4)],
        row("most common opening (share of stories)", opening),
        row("opening entropy (bits); distinct openings",
            lambda r: f"{r['openings']['entropy_bits']:.2f}; {r['openings']['distinct']:,}"),
        row("exact duplicates", lambda r: f"{r['duplicates']['exact']:,} ({r['duplicates']['exact_share']:.2%})"),
        row(f"near-duplicates (Jaccard >= {args.jaccard:g}) in a sample",
            lambda r: f"{r['duplicates']['near_share']:.2%} of {r['duplicates']['near_sample']:,}"),
        row("Flesch reading ease", lambda r: read(r, "flesch_reading_ease")),
        row("Flesch-Kincaid grade", lambda r: read(r, "flesch_kincaid_grade")),
        row("Dale-Chall score", lambda r: read(r, "dale_chall_readability_score")),
        row("labels (the pair least likely independent: p, Cramér's V)", lambda r: (
            f"{sum(isinstance(v, dict) for v in r['labels'].values())} ({' x '.join(r['label_pairs'][0]['labels'])}: "
            f"p {r['label_pairs'][0]['p']:.2g}, V {r['label_pairs'][0]['cramers_v']:.2f})" if r["label_pairs"] else
            str(sum(isinstance(v, dict) for v in r["labels"].values())))),
        row("stories per second", lambda r: f"{r['stories_per_second']:,}"),
    ]
    text = [f"# Data report\n\nMethods are in data.json (\"method\") and data_report.py. Readability: mean ± 95% "
            f"interval over a uniform sample of {', '.join(str(r['readability']['stories']) for r in results)} stories.\n",
            markdown_table(["", *[r["data"] for r in results]], rows)]
    for r in results:
        text.append(f"\n## {r['data']}\n\nMost common openings (first {OPENING_WORDS} words):\n")
        text.append(markdown_table(["opening", "stories", "share"],
                                   [(o["opening"], f"{o['stories']:,}", f"{o['share']:.2%}") for o in r["openings"]["top"]]))
        balanced = {k: v for k, v in r["labels"].items() if isinstance(v, dict)}
        if balanced:
            text.append("\nLabel balance (1 = every value equally often):\n")
            text.append(markdown_table(["label", "values", "balance", "most common", "least common"], [
                (k, v["values"], f"{v['balance']:.3f}", f"{v['most_common'][0] or '(none)'} {v['most_common'][1]:.1%}",
                 f"{v['least_common'][0] or '(none)'} {v['least_common'][1]:.1%}") for k, v in balanced.items()]))
            k = len(r["label_pairs"])
            text.append(f"\nLabel pairs least likely independent (Pearson's chi-square test; of {k} pairs, a p under "
                        f"{0.05 / k:.2g} is evidence of dependence at 5% (Bonferroni); the test needs about 5 stories "
                        f"a cell: with fewer, Cramér's V is biased up and p unreliable):\n")
            text.append(markdown_table(["labels", "Cramér's V", "chi2", "df", "p", "stories a cell"], [
                (" x ".join(p["labels"]), f"{p['cramers_v']:.3f}", f"{p['chi2']:.1f}", p["df"], f"{p['p']:.3g}",
                 f"{p['stories_per_cell']:.1f}") for p in r["label_pairs"][:10]]))
    return "\n".join(text) + "\n"


def data_plots(eval_dir, results):
    plt = pyplot()
    if plt is None:
        return []
    paths = []
    fig, ax = plt.subplots(figsize=(7, 5))
    for r in results:
        f = np.array(r["zipf"]["top_frequencies"], dtype=np.float64) / max(1, r["zipf"]["fourgrams"])
        ranks = np.arange(1, len(f) + 1)
        line, = ax.loglog(ranks, f, lw=1.2, label=f"{r['data']} (s = {r['zipf']['exponent'] or float('nan'):.2f})")
        if r["zipf"]["exponent"] is not None:
            fit = ranks[:r["zipf"]["ranks_fitted"]]
            # the fitted line through the geometric means of the fitted points
            points = np.unique(np.geomspace(1, len(fit), num=min(ZIPF_POINTS, len(fit))).round().astype(np.int64))
            offset = np.mean(np.log(f[points - 1]) + r["zipf"]["exponent"] * np.log(points))
            ax.loglog(fit, np.exp(offset) * fit ** -r["zipf"]["exponent"], ls="--", lw=0.8, color=line.get_color())
    ax.set_xlabel("rank of the 4-gram")
    ax.set_ylabel("share of all 4-grams")
    ax.set_title(f"4-gram rank-frequency; dashed: the fitted Zipf law over the top {ZIPF_RANKS:,} ranks", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    paths.append(save_figure(fig, os.path.join(eval_dir, "zipf.png")))

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        h = np.array(r["words"]["histogram"], dtype=np.float64)
        top = max(r["words"]["p95"] * 2, 50)
        edges = np.arange(0, top + 10, 10)
        binned = np.add.reduceat(np.pad(h, (0, max(0, edges[-1] - len(h))))[:edges[-1]], edges[:-1]) / h.sum()
        ax.step(edges[:-1], binned, where="post", label=r["data"])
    ax.set_title("length of the stories", fontsize=9)
    ax.set_xlabel("words per story (bins of 10)")
    ax.set_ylabel("share of stories")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    paths.append(save_figure(fig, os.path.join(eval_dir, "lengths.png")))

    labels = [k for k in LABELS if any(isinstance(r["labels"].get(k), dict) for r in results)]
    if labels:
        cols = 3
        fig, axes = plt.subplots(math.ceil(len(labels) / cols), cols, figsize=(12, 3 * math.ceil(len(labels) / cols)),
                                 squeeze=False)
        for ax, k in zip(axes.flat, labels):
            for r in results:
                if isinstance(r["labels"].get(k), dict):
                    v = r["labels"][k]
                    shares = np.array(list(v["counts"].values()), dtype=np.float64) / v["stories"]
                    ax.plot(np.arange(1, len(shares) + 1), shares, marker=".", ms=3, lw=1, label=r["data"])
                    ax.axhline(1 / len(shares), ls=":", lw=0.8, color="gray")
            ax.set_title(f"{k}", fontsize=9)
            ax.set_xlabel("value, most common first", fontsize=7)
            ax.set_ylabel("share of stories", fontsize=7)
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[len(labels):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        fig.suptitle("label balance: each value's share, sorted; dotted: every value equally often", fontsize=9)
        fig.tight_layout()
        paths.append(save_figure(fig, os.path.join(eval_dir, "labels.png")))
    elif os.path.exists(os.path.join(eval_dir, "labels.png")):  # an earlier report's, of other data
        os.remove(os.path.join(eval_dir, "labels.png"))
    return paths

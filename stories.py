"""The story side of the generator: what a fork edits for another language or domain.

- the axes a prompt is sampled over (load_axes reads axes.json) and the sampler: prompt k is a
  function of (seed, k) alone, each axis drawn on its own, so shards never overlap;
- the prompt text asking for several stories separated by a marker line (prompt_text);
- the cleaning rules that fix an answer's stories or drop them, each counted by name (clean_story),
  the hint a run that stops gives for each (HINTS), and the record written for a story (make_records);
- the dry run: example prompts, how often each axis value is drawn, a chi-square test of independence
  for every pair of axes, and the tokens and dollars the job will cost;
- reading a chat completion's text and token counts (parse_completion, token_counts), which judge.py shares.

A record: id (the story's SHA-1, as tokenizer.py derives it), story (paragraphs separated by a blank
line), the labels theme, topic, style, feature, grammar ("" if none), persona ("" if none),
initial_word_type, initial_letter, num_paragraphs; and how it was made: prompt_id, prompt, seed,
completion_id, story_index (its place in the answer), model (as the API reports it), temperature,
top_p, max_tokens, finish_reason, prompt_tokens and completion_tokens (of the whole completion).

generate_stories.py sends the prompts and writes the records; a fork rarely needs to touch it.
"""

import hashlib
import itertools
import json
import math
import re
import time
import unicodedata

import numpy as np
from tqdm import tqdm

from api_client import BATCH_DISCOUNT, message_tokens, price_per_token
from configurator import die
from tokenizer import story_id  # a record's id: the story's SHA-1 in 16 hex digits

TOKENS_PER_PARAGRAPH = 75  # dry-run guess at output length: ~55 simple words a paragraph, ~1.3 tokens a word
SEPARATOR = "###"  # the line the model puts between two stories
HINTS = {  # why the stories of an answer were removed -> what to do when it happens to (nearly) all of them
    "separator_failed": f"the model does not put a line with only {SEPARATOR} between stories; try"
                        f" --stories_per_prompt=1 or another --model",
    "truncated": "the answers are cut at --max_tokens; raise it",
    "content_filter": "a content filter cuts the answers; try another --model or other --axes",
    "non_ascii": "the stories are not in ASCII; --ascii=False for another language",
    "too_short": "the stories are shorter than --min_words; lower it",
    "too_long": "the stories are longer than --max_words; raise it",
    "wrong_paragraphs": "the model does not write the paragraph count asked for; try another --model",
    "empty": "the answers are empty or refusals; try another --model",
    "duplicate": "the model writes the same stories again; raise --temperature",
}

# record label -> key in axes.json
AXES = {"theme": "themes", "topic": "topics", "style": "styles", "feature": "features", "grammar": "grammar",
        "persona": "personas", "initial_word_type": "initial_word_types", "initial_letter": "initial_letters",
        "num_paragraphs": "num_paragraphs"}
N_NAMES = 3  # character names offered in each prompt
OPTIONAL = ("grammar", "persona")  # the axes a prompt may leave out (their label is then "")



# -----------------------------------------------------------------------------
# axes and sampler


def load_axes(path):
    """{label: (values, cumulative probabilities)} for each axis of an axes file, and its names."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        die(f"cannot read the axes file {path}: {e}")
    if not isinstance(raw, dict):
        die(f"{path} holds a JSON {type(raw).__name__}, not an object of axes at the top level;"
                 f" copy the layout of the repo's axes.json")
    unknown = [k for k in raw if k not in (*AXES.values(), "optional", "names") and not k.startswith("_")]
    if unknown:  # a new axis needs code here: the prompt text, the record, prepare.py's labels
        die(f"{path} has keys that are not axes: {', '.join(map(repr, unknown))} (the axes are "
            f"{', '.join(AXES.values())}; a key starting with _ is a note)")
    optional = raw.get("optional", {})  # label: probability that the axis is present
    if not isinstance(optional, dict):
        die(f"'optional' in {path} must be an object of label: probability, e.g. {{\"grammar\": 0.5}}")
    if set(optional) - set(OPTIONAL):
        die(f"'optional' in {path} names {', '.join(map(repr, sorted(set(optional) - set(OPTIONAL))))}: only "
            f"{' and '.join(OPTIONAL)} may be left out of a prompt")

    def number(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    axes = {}
    for label, key in AXES.items():
        entry = raw.get(key)
        if isinstance(entry, dict):  # value: weight; keys starting with _ are notes
            values = [v for v in entry if not v.startswith("_")]
            weights = [entry[v] for v in values]
        elif isinstance(entry, list):
            values, weights = entry, [1.0] * len(entry)
        else:
            die(f"{path} has no list '{key}'; copy the layout of the repo's axes.json")
        if not values or not all(number(w) and w > 0 for w in weights):
            die(f"'{key}' in {path} must be non-empty, with positive weights")
        if label == "num_paragraphs":  # counts: numbers in a list, strings as the keys of a dict
            if not all(str(v).isdigit() and int(v) >= 1 for v in values):
                die(f"'{key}' in {path} must be whole numbers >= 1, got {values}")
            values = [int(v) for v in values]
        elif not all(isinstance(v, str) and v.strip() for v in values):
            die(f"'{key}' in {path} must be non-empty strings, got"
                     f" {next(v for v in values if not isinstance(v, str) or not v.strip())!r}")
        weights = np.array(weights, dtype=np.float64) / sum(weights)
        if label in optional:  # present with this probability, else ""
            present = optional[label]
            if not number(present) or not 0 < present <= 1:
                die(f"optional '{label}' in {path} must be a probability in (0, 1], got {present!r}")
            values, weights = [""] + values, np.concatenate([[1 - present], present * weights])
        axes[label] = (values, np.cumsum(weights))
    names = raw.get("names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
        die(f"{path} has no list 'names' of character names (non-empty strings)")
    return axes, names


GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment


def mix64(x):
    """splitmix64's output function on a uint64 array: a bijection whose outputs look independent."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def sample_prompts(axes, names, seed, ks):
    """Value indices of each axis, and of N_NAMES names, for prompt ids ks (an int array).
    Prompt k's draws are the splitmix64 stream started at mix64(seed key ^ k): a function of (seed, k)
    only, so vectorised sampling of a million prompts is as reproducible as one at a time."""
    key = mix64(np.array([(seed + GOLDEN) % 2**64], dtype=np.uint64))
    state = mix64(np.asarray(ks, dtype=np.uint64) ^ key)

    def uniform(stream):  # the stream-th draw of each prompt, in [0, 1)
        return (mix64(state + np.uint64(stream * GOLDEN % 2**64)) >> np.uint64(11)) * 2.0 ** -53

    idx = {}
    for stream, (label, (values, cdf)) in enumerate(axes.items(), start=1):
        idx[label] = np.minimum(np.searchsorted(cdf, uniform(stream), side="right"), len(values) - 1)
    idx["names"] = np.stack([(uniform(100 + j) * len(names)).astype(np.int64) for j in range(N_NAMES)], axis=1)
    return idx


def prompt_at(axes, names, idx, j):
    """The labels and the names of the j-th prompt of a sample."""
    labels = {label: values[idx[label][j]] for label, (values, _) in axes.items()}
    return labels, list(dict.fromkeys(names[i] for i in idx["names"][j]))


def prompts_for(axes, names, args, ks):
    """(k, labels, prompt) for each prompt id in ks."""
    idx = sample_prompts(axes, names, args.seed, ks)
    for j, k in enumerate(ks):
        labels, prompt_names = prompt_at(axes, names, idx, j)
        yield k, labels, prompt_text(labels, prompt_names, args.stories_per_prompt)


def iter_prompts(axes, names, args, skip=()):
    """(k, labels, prompt) for this shard's prompts in order, leaving out the ids in skip."""
    for start in itertools.count(0, 4096):
        ks = args.shard_index + args.n_shards * np.arange(start, start + 4096)
        yield from prompts_for(axes, names, args, [k for k in ks.tolist() if k not in skip])

# -----------------------------------------------------------------------------
# prompt


def prompt_text(labels, names, stories_per_prompt):
    """The user message asking for stories_per_prompt stories with these labels."""
    word_type, p = labels["initial_word_type"], labels["num_paragraphs"]
    names = " or ".join(filter(None, [", ".join(names[:-1]), names[-1]]))  # "Mia, Leo or Ava"
    rules = [f"Theme: {labels['theme']}. Topic: {labels['topic']}. Style: {labels['style']}.",
             f"Include {labels['feature']}."]
    if labels["grammar"]:
        rules.append(f"Use {labels['grammar']}.")
    if labels["persona"]:
        rules.append(f"Tell it in the first person, as {labels['persona']}.")
    rules += ["Write exactly one paragraph." if p == 1 else f"Write exactly {p} paragraphs, separated by a blank line.",
              f'Start with {"an" if word_type[0] in "aeiou" else "a"} {word_type} that begins with the letter '
              f'"{labels["initial_letter"]}".',
              f"If a character needs a name, you may use {names}.",
              "No title, no numbering, no comments."]
    simple = "in very simple words that a three-year-old understands"
    if stories_per_prompt == 1:
        head, tail = f"Write a short story for young children, {simple}. Follow these rules:", ""
    else:
        head = (f"Write {stories_per_prompt} short stories for young children, {simple}."
                f" Every story follows these rules:")
        tail = f'\nStart each story differently. Put a line with only "{SEPARATOR}" between two stories.'
    return head + "\n" + "\n".join(f"- {r}" for r in rules) + tail

# -----------------------------------------------------------------------------
# cleaning and records


TYPOGRAPHY = str.maketrans({
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u2033": '"', "\u00ab": '"', "\u00bb": '"',
    "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": " - ", "\u2015": " - ",
    "\u2026": "...", "\u00a0": " ", "\u2009": " ", "\u202f": " ", "\t": " ", "\r": "",
})
SEPARATOR_LINE = re.compile(rf"^[ \t]*{re.escape(SEPARATOR)}.*$", re.M)  # '### Story 2' counts as a separator
CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")
NUMBERING = re.compile(r"^[*#\s]*(story\s*)?\d+\s*[.):]\s*(\*\*)?\s*", re.I)


def clean_story(text, num_paragraphs, args):
    """(story, None, fixes) with the story as plain paragraphs separated by a blank line, or
    (None, rule, fixes) with the name of the rule that drops it."""
    fixes = []
    fixed = text.translate(TYPOGRAPHY)
    if fixed != text:
        fixes.append("typography")
    if args.ascii and not fixed.isascii():
        # NFKD splits accented letters (and ligatures, full-width forms) into ASCII plus combining marks
        fixed = "".join(c for c in unicodedata.normalize("NFKD", fixed) if not unicodedata.combining(c))
        if not fixed.isascii():
            return None, "non_ascii", fixes
        fixes.append("transliterated")
    fixed = CONTROL.sub("", fixed)
    # paragraphs are separated by blank lines; a model that uses single line breaks throughout means the same
    blocks = re.split(r"\n\s*\n", fixed.strip()) if re.search(r"\n\s*\n", fixed) else fixed.strip().split("\n")
    paragraphs = ["\n".join(" ".join(line.split()) for line in b.strip().split("\n")) for b in blocks if b.strip()]
    if paragraphs and len(paragraphs[0].split()) <= 12 and "\n" not in paragraphs[0] and (
            paragraphs[0][0] in "#*" or paragraphs[0].lower().startswith("title") or paragraphs[0][-1] not in ".!?\"'"):
        paragraphs = paragraphs[1:]  # a title, or a preamble such as "Here are your stories:"
        fixes.append("title")
    if paragraphs and NUMBERING.match(paragraphs[0]):
        paragraphs[0] = NUMBERING.sub("", paragraphs[0], count=1)
        fixes.append("numbering")
    story = "\n\n".join(p for p in paragraphs if p)
    n_words = len(story.split())
    if abs(story.count("\n\n") + 1 - num_paragraphs) > 1:
        return None, "wrong_paragraphs", fixes
    if n_words < args.min_words:
        return None, "too_short", fixes
    if n_words > args.max_words:
        return None, "too_long", fixes
    return story, None, fixes


def duplicate_key(story):
    """64-bit hash of the story with case and spacing normalized: stories with the same key are duplicates."""
    return hashlib.blake2b(" ".join(story.lower().split()).encode(), digest_size=8).digest()


def parse_completion(body):
    """(text, finish_reason, id, model) of a chat completion as JSON; ValueError if it is not one, its text is not
    a string (a list of content parts) or its usage not token counts: an answer that gives no story or grade."""
    try:
        choice = body["choices"][0]
        text = choice["message"]["content"] or ""
        if not isinstance(text, str):
            raise TypeError(f"content is a {type(text).__name__}, not a string")
        token_counts(body)
        return text, choice.get("finish_reason"), body.get("id", ""), body.get("model", "")
    except (KeyError, IndexError, TypeError, AttributeError) as e:
        raise ValueError(f"not a chat completion: {e!r}") from None


def token_counts(body):
    """(prompt_tokens, completion_tokens) of a chat completion; 0 for what a server leaves out or sends as null,
    TypeError for usage that is not counts."""
    usage = body.get("usage") or {}
    if not isinstance(usage, dict):
        raise TypeError(f"usage is {usage!r}, not token counts")
    counts = tuple(usage.get(key) or 0 for key in ("prompt_tokens", "completion_tokens"))
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts):
        raise TypeError(f"usage is {usage!r}, not token counts")
    return counts


def make_records(k, labels, prompt, body, args, out, removed, fixed):
    """The records of the stories in one completion that pass the cleaning rules (counted in removed/fixed)."""
    text, finish_reason, completion_id, model = parse_completion(body)
    prompt_tokens, completion_tokens = token_counts(body)
    chunks = [c for c in SEPARATOR_LINE.split(text) if c.strip()]
    if not chunks:  # a refusal, or nothing at all
        removed["empty"] += 1
        return []
    if finish_reason in ("length", "content_filter"):  # cut at max_tokens or by a filter: the last story is unfinished
        chunks = chunks[:-1]
        removed["truncated" if finish_reason == "length" else "content_filter"] += 1
    elif args.stories_per_prompt > 1 and len(chunks) == 1:  # several stories run together, labels unsure
        removed["separator_failed"] += 1
        return []
    if len(chunks) > args.stories_per_prompt:
        removed["extra_stories"] += len(chunks) - args.stories_per_prompt
        chunks = chunks[:args.stories_per_prompt]
    records, keys = [], set()
    for i, chunk in enumerate(chunks):
        story, rule, fixes = clean_story(chunk, labels["num_paragraphs"], args)
        fixed.update(fixes)
        if story is not None:
            key = duplicate_key(story)
            rule = "duplicate" if key in out.keys or key in keys else None
        if rule:
            removed[rule] += 1
            continue
        keys.add(key)
        records.append({"id": story_id(story), "story": story, **labels, "prompt_id": k, "prompt": prompt,
                        "seed": args.seed, "completion_id": completion_id, "story_index": i, "model": model,
                        "temperature": args.temperature, "top_p": args.top_p, "max_tokens": args.max_tokens,
                        "finish_reason": finish_reason, "prompt_tokens": prompt_tokens,
                        "completion_tokens": completion_tokens})
    return records

# -----------------------------------------------------------------------------
# dry run: axis counts, independence, cost


def chi_square(table):
    """(chi2, df, p) of Pearson's test that the rows and columns of a contingency table are independent
    (scipy's chi2_contingency, no continuity correction), over the rows and columns that hold a count."""
    from scipy.stats import chi2_contingency  # imported here: only the dry run needs scipy, and it is large

    table = table[table.sum(1) > 0][:, table.sum(0) > 0]
    if min(table.shape) < 2:  # one value drawn on an axis: nothing to test
        return 0.0, 0, 1.0
    result = chi2_contingency(table, correction=False)
    return float(result.statistic), int(result.dof), float(result.pvalue)


def dry_run(args, axes, names):
    """Print example prompts, the count of each axis value, the independence check and the cost."""
    n_prompts = math.ceil(args.target / args.stories_per_prompt)
    t0 = time.time()
    print(f"{n_prompts:,} prompts of {args.stories_per_prompt} stories for {args.target:,} stories"
          f" (shard {args.shard}, seed {args.seed}, axes {args.axes})\n")
    for k, labels, prompt in itertools.islice(iter_prompts(axes, names, args), args.n_examples):
        print(f"--- prompt {k} ---\n{prompt}\n")

    labels = list(axes)
    sizes = {label: len(axes[label][0]) for label in labels}
    counts = {label: np.zeros(sizes[label], dtype=np.int64) for label in labels}
    pairs = list(itertools.combinations(labels, 2))
    tables = {(a, b): np.zeros(sizes[a] * sizes[b], dtype=np.int64) for a, b in pairs}
    paragraphs = 0
    # the chi-square test needs some prompts in most cells of a table: a small job is checked on more
    n_checked = max(n_prompts, 100_000)
    bar = tqdm(total=n_checked, desc="sampling", unit=" prompts", unit_scale=True, delay=2)
    for start in range(0, n_checked, 1 << 20):  # in chunks of a million, to keep memory flat
        j = np.arange(start, min(start + (1 << 20), n_checked))
        idx = sample_prompts(axes, names, args.seed, args.shard_index + args.n_shards * j)
        for a, b in pairs:
            tables[a, b] += np.bincount(idx[a] * sizes[b] + idx[b], minlength=sizes[a] * sizes[b])
        job = j < n_prompts
        for label in labels:
            counts[label] += np.bincount(idx[label][job], minlength=sizes[label])
        paragraphs += int(np.asarray(axes["num_paragraphs"][0])[idx["num_paragraphs"][job]].sum())
        bar.update(len(j))
    bar.close()

    print("count of each axis value:")
    for label in labels:
        values = axes[label][0]
        line = ", ".join(f"{v if v != '' else '(none)'} {c:,}" for v, c in zip(values, counts[label]))
        print(f"  {label} ({len(values)} values): {line}")

    print(f"\nindependence of each pair of axes, in {n_checked:,} prompts (chi-square test; p should look uniform,"
          f" never tiny):")
    results = []
    for a, b in pairs:
        chi2, df, p = chi_square(tables[a, b].reshape(sizes[a], sizes[b]))
        results.append((p, a, b))
        print(f"  {a + ' x ' + b:36s} chi2 {chi2:12.1f}  df {df:6d}  p {p:.3f}")
    if axes["persona"][0][0] == "":  # the published dataset has personas only in 1-, 4- and 7-paragraph stories
        persona = tables["persona", "num_paragraphs"].reshape(sizes["persona"], sizes["num_paragraphs"])
        share = 1 - persona[0] / np.maximum(persona.sum(0), 1)
        print("  persona present, by num_paragraphs: "
              + "  ".join(f"{n}: {s:.0%}" for n, s in zip(axes["num_paragraphs"][0], share)))
    threshold = 0.01 / len(pairs)  # Bonferroni: a 1% chance that some pair of a fair sampler fails
    p_min, a, b = min(results)
    verdict = "passed" if p_min > threshold else "FAILED"
    print(f"independence check: {verdict} (smallest p {p_min:.2g} for {a} x {b}; threshold 0.01/{len(pairs)})")

    sample = [prompt for _, _, prompt in itertools.islice(iter_prompts(axes, names, args), 2000)]
    per_prompt, how = message_tokens(sample, args.model)
    tokens_in, tokens_out = per_prompt * n_prompts, paragraphs * args.stories_per_prompt * TOKENS_PER_PARAGRAPH
    print(f"\ntokens: {tokens_in:,.0f} in ({per_prompt:.0f} a prompt, {how}),"
          f" {tokens_out:,.0f} out ({TOKENS_PER_PARAGRAPH} a paragraph, a rough guess)")
    price = price_per_token(args)
    if price:
        cost = tokens_in * price[0] + tokens_out * price[1]
        print(f"cost: ${cost:,.2f} for {args.model}" + (" with the Batch API" if args.batch else
                                                        f" (${cost * BATCH_DISCOUNT:,.2f} with --batch)")
              + ", prices of 2025-08 (--price_in/--price_out to change), plus a few % for stories the cleaning drops")
    else:
        print(f"cost: no price known for {args.model}; give --price_in and --price_out (USD per million tokens)")
    print(f"dry run took {time.time() - t0:.1f} s")

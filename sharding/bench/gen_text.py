# Synthetic English-like text for prepare benchmarks: words drawn with tinyshakespeare's
# word frequencies (Zipf-like), plus random made-up words and numbers so the word cache sees
# a long tail; sentences, lines and blank-line-separated paragraphs.
import random, re, sys
src = open(sys.argv[1]).read()
target = int(sys.argv[3])
words = re.findall(r"[A-Za-z']+", src)
freq = {}
for w in words:
    freq[w] = freq.get(w, 0) + 1
vocab = list(freq)
weights = [freq[w] for w in vocab]
rng = random.Random(42)
letters = "abcdefghijklmnopqrstuvwxyz"
# 200k made-up words for the tail
tail = ["".join(rng.choice(letters) for _ in range(rng.randint(3, 12))) for _ in range(200_000)]
punct = [",", ",", ".", ".", ".", ";", ":", "!", "?", " --"]
out = open(sys.argv[2], "w")
written = 0
while written < target:
    ws = rng.choices(vocab, weights, k=200_000)
    parts = []
    line_len = 0
    for i, w in enumerate(ws):
        r = rng.random()
        if r < 0.03:
            w = rng.choice(tail)
        elif r < 0.035:
            w = str(rng.randint(0, 100000))
        parts.append(w)
        line_len += len(w) + 1
        r = rng.random()
        if r < 0.08:
            parts.append(rng.choice(punct))
        if line_len > 70:
            parts.append("\n\n" if rng.random() < 0.12 else "\n")
            line_len = 0
        else:
            parts.append(" ")
    chunk = "".join(parts).replace(" \n", "\n")
    out.write(chunk)
    written += len(chunk)
out.close()

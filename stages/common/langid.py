"""Language identification for clean: py3langid, a batch of texts at a time."""

from __future__ import annotations

from typing import Any


class LanguageId:
    """py3langid with normalised probabilities (its model ships inside the package).

    `many` classifies a batch as `classify` does each text, to the same label and probability:
    py3langid walks a byte automaton over each text in a Python loop (most of clean's time), so
    here the automaton takes one step for every text of the batch at once, in numpy, and only the
    last long texts finish in the loop; the feature counts then go through py3langid's own scoring."""

    HEAD = 20_000
    """Characters of a text read: a long page's head says enough."""
    LOOP_BELOW = 8
    """Texts still walking when the batch step hands over to the plain loop (a numpy step costs
    about as much as this many single-byte steps in Python)."""

    def __init__(self) -> None:
        import numpy as np
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        class Scored(LanguageIdentifier):
            """py3langid's scoring of the feature counts `many` found (its `_raw_score` would walk
            the text again), against its table widened from float16 to float32 once: numpy
            widens it anyway for every product, and the sums come out the same."""

            __slots__ = ("visits", "table")

            @staticmethod
            def _encode(text: str | bytes) -> bytes:
                # `many` hands over what py3langid's own `_encode` made of the text already
                return text if isinstance(text, bytes) else LanguageIdentifier._encode(text)

            def _raw_score(self, text: bytes) -> Any:
                ids, counts = self.visits
                if ids.size:  # py3langid's `_sparse_score` on these arrays: the same product
                    return np.log1p(counts) @ self.table[ids] + self.nb_pc
                return super()._raw_score(b"")  # no feature: py3langid's own answer for that

        self.model = Scored.from_model_file(MODEL_FILE, norm_probs=True)
        self.model.table = self.model.nb_ptc.astype(np.float32)
        self.next_state = np.frombuffer(self.model.tk_nextmove, np.uint32)
        self.row_base = np.asarray(self.model._rowbase, np.int64)
        self.output = np.asarray(self.model.tk_output, np.int32)

    def __call__(self, text: str) -> tuple[str, float]:
        return self.many([text])[0]

    def many(self, texts: list[str]) -> list[tuple[str, float]]:
        """(language, probability) of each text."""
        import numpy as np

        model = self.model
        encoded = [model._encode(t[: self.HEAD]) for t in texts]
        lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
        order = np.argsort(-lengths, kind="stable")  # longest first: the texts still walking are a prefix
        size = lengths[order]
        starts = np.cumsum(size) - size
        data = np.frombuffer(b"".join(encoded[i] for i in order), np.uint8)
        states = np.empty(data.size, np.int64)  # the automaton's state after each byte
        state = np.zeros(len(texts), np.int64)
        walking = np.searchsorted(-size, -np.arange(int(size[0]) + 1 if size.size else 0), side="left")
        step = 0
        while step < walking.size and walking[step] > self.LOOP_BELOW:
            m = walking[step]
            at = starts[:m] + step
            state[:m] = self.next_state[self.row_base[state[:m]] + data[at]]
            states[at] = state[:m]
            step += 1
        if step < walking.size:  # the longest few texts: the rest of their bytes in a plain loop
            next_state, row_base = self.model.tk_nextmove, self.model._rowbase
            for j in range(int(walking[step])):
                s = int(state[j])
                walked = []
                for byte in data[starts[j] + step: starts[j] + size[j]].tobytes():
                    s = next_state[row_base[s] + byte]
                    walked.append(s)
                states[starts[j] + step: starts[j] + size[j]] = walked
        # The features each text visits and how often, in the order py3langid's Counter holds them
        # (first seen first), which sets the order their scores are summed in and so their last bits.
        # One plain sort of (feature, position) keys groups the visits by feature and, within a
        # feature, by text (texts lie one after the other); a group's first key is its first visit.
        # Each group's count, written at its first visit, then reads back in text order.
        features = self.output[states]
        at = np.flatnonzero(features >= 0)
        shift = max(int(data.size).bit_length(), 1)
        keys = np.sort((features[at].astype(np.int64) << shift) | at)
        feature, position = keys >> shift, keys & ((1 << shift) - 1)
        text_of = np.repeat(np.arange(len(texts), dtype=np.int32), size)[position]
        new = np.flatnonzero((feature[1:] != feature[:-1]) | (text_of[1:] != text_of[:-1])) + 1
        first = np.concatenate(([0], new)) if keys.size else new
        count_at = np.zeros(data.size, np.float32)  # py3langid scores float32 counts
        count_at[position[first]] = np.diff(first, append=keys.size)
        visited = np.flatnonzero(count_at)  # each text's features, first seen first
        ids, counts = features[visited].astype(np.intp), count_at[visited]
        bounds = np.searchsorted(visited, np.append(starts, data.size), side="left").tolist()
        out: list[tuple[str, float]] = [("", 0.0)] * len(texts)
        for j, i in enumerate(order.tolist()):
            model.visits = (ids[bounds[j]: bounds[j + 1]], counts[bounds[j]: bounds[j + 1]])
            lang, prob = model.classify(encoded[i])
            out[i] = (lang, float(prob))
        return out

"""Turning streamed text-token ids into displayable text."""

from __future__ import annotations

# Ids the model emits while no word is spoken: 0 = end of padding, 3 = padding.
SILENT_IDS = (0, 3)


class TextStreamer:
    """Maps each text id sampled by ``LmGen`` to the text to print (``""`` for silent ids).

    ``tokenizer`` is a ``sentencepiece.SentencePieceProcessor`` (``tokenizer_spm_32k_3.model``);
    its word-start marker ``▁`` becomes a space, as upstream displays it.
    """

    def __init__(self, tokenizer, silent_ids: tuple[int, ...] = SILENT_IDS):
        self.tokenizer = tokenizer
        self.silent_ids = set(silent_ids)

    def piece(self, token_id: int) -> str:
        token_id = int(token_id)
        if token_id in self.silent_ids or not 0 <= token_id < self.tokenizer.get_piece_size():
            return ""
        return self.tokenizer.id_to_piece(token_id).replace("\u2581", " ")

    def decode(self, token_ids) -> str:
        """The text of a whole sequence of streamed ids."""
        return "".join(self.piece(t) for t in token_ids)

"""Readers for `collect`: one module per family of source, each with its typed source config.

A reader is `read(src, where, stats) -> Iterator[record | Drop]`: it yields plain records
(`{"id", "text"}` for the corpus, `{"id", "messages"}` for instructions, `{"id", "prompt",
"chosen", "rejected"}` for preferences; `id` None when the source has none) or a
`stages.common.io.Drop` for each item it could not turn into one, and raises `StageError` naming
`where` (the source's params key) when the source itself is unusable. `stats` counts repairs
(a file decoded from a legacy encoding). Readers read files or the network, never write.
Every reader that opens files goes through `safe` (symlinks out of the source refused, the size
cap `max_file_bytes`, binary told by content, line-oriented data decoded line by line).

- `base`: the fields every source has, and helpers for fields of JSON-like rows;
- `safe`: opening files and decoding their bytes safely (shared by the file readers);
- `files`: plain text files and folders, word/POS-tagged corpora, URLs (bytes -> text);
- `jsonl`: JSON lines (or a JSON array) of documents;
- `parquet`: Parquet files of documents;
- `mediawiki`: MediaWiki XML dumps (plain or .bz2), streamed;
- `hub`: Hugging Face `datasets` (a `save_to_disk` folder or a hub name), any kind;
- `chat`: instruction (Alpaca, chat messages) and preference-pair records;
- `bigbench`: BIG-bench tasks as instructions and preference pairs;
- `archive`: zip and tar archives whose members are read like the files of a folder.
"""

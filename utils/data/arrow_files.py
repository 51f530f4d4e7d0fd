"""A split's rows read from, and written to, Arrow files by plain reads instead of the memory map.

Pages of a memory-mapped file that have been read count in the process's resident memory for as
long as the file stays mapped, so reading a whole corpus through the map (as indexing a split,
or ``save_to_disk``, does) makes the peak memory grow with the corpus. Plain reads go through
the page cache, and what was read is freed as the next record batch comes. Files are written in
record batches of some MiB: opening a file maps it and walks its batches, and the kernel's
read-ahead at each batch would otherwise make even that touch a good part of the file.

Every file written here gets its checksum as its bytes go out (``written_digest``), for the
tokenized-data cache to check its entries by (utils/data/cache.py).
"""

import os
from collections.abc import Iterable, Iterator

import pyarrow as pa
from datasets import Dataset

from utils.files import DigestingWriter, file_digest


def file_span(rows: Dataset) -> tuple[str, int, int] | None:
    """``(Arrow file, first row, end row)`` when the split is one run of rows of one file; else None.

    A held-out part or a prefix of a split is a slice of the file's table (datasets records the
    operations done to a memory-mapped table as its ``replays``); a selection through an index
    mapping, a filter or a shard is not a run of rows and is read through ``rows`` instead.
    """
    replays = getattr(rows.data, "replays", None)
    if rows._indices is not None or len(rows.cache_files) != 1 or replays is None:
        return None
    first = 0
    for operation, args, kwargs in replays:
        if operation == "slice":
            first += (args[0] if args else kwargs.get("offset", 0)) or 0
        elif operation != "replace_schema_metadata":
            return None
    return rows.cache_files[0]["filename"], first, first + len(rows)


def whole_file(rows: Dataset) -> str | None:
    """The Arrow file that holds exactly ``rows``, all of it and nothing else; else None."""
    span = file_span(rows)
    if span is None or any(operation == "slice" for operation, *_ in rows.data.replays):
        return None
    return span[0]


def file_batches(span: tuple[str, int, int]) -> Iterator[pa.RecordBatch]:
    """The rows of ``span`` (``file_span``), one record batch at a time."""
    path, first, stop = span
    seen = 0  # rows of the file before the current batch
    with pa.OSFile(path) as source, pa.ipc.open_stream(source) as reader:
        for batch in reader:
            lo, hi = max(first - seen, 0), min(stop - seen, batch.num_rows)
            seen += batch.num_rows
            if lo < hi:
                yield batch.slice(lo, hi - lo)
            if seen >= stop:
                return


def file_column(span: tuple[str, int, int], name: str) -> Iterator[pa.Array]:
    """Column ``name`` of the rows of ``span``, one record batch at a time."""
    for batch in file_batches(span):
        yield batch.column(batch.schema.get_field_index(name))


def write_rows(rows: Dataset, path: str) -> tuple[str, int]:
    """All of ``rows`` into one Arrow file at ``path``, which ``Dataset.from_file`` reads back the same.

    Returns the file's checksum and size (``utils.files.file_digest``'s), taken as it was written.
    """
    span = file_span(rows)
    if span is None:  # rows from several files or through an index mapping: through datasets, at once
        table = rows.with_format("arrow")[:]
        batches = table.replace_schema_metadata(rows.features.arrow_schema.metadata).to_batches()
        schema = table.schema.with_metadata(rows.features.arrow_schema.metadata)
    else:
        with pa.OSFile(span[0]) as source, pa.ipc.open_stream(source) as reader:
            schema = reader.schema
        batches = file_batches(span)
    return write_batches(path, schema, batches)


BATCH_BYTES = 4 << 20  # the size of the record batches written


_WRITTEN: dict[str, tuple[str, int]] = {}  # checksum and size of each file write_batches wrote, by path


def write_batches(path: str, schema: pa.Schema, batches: Iterable[pa.RecordBatch]) -> tuple[str, int]:
    """``batches`` into an Arrow stream file, gathered into record batches of about BATCH_BYTES.

    Returns the file's checksum and size, taken from its bytes as they were written.
    """
    gathered, size = [], 0
    with DigestingWriter(path) as sink:
        with pa.ipc.new_stream(sink, schema) as writer:
            for batch in batches:
                gathered.append(batch)
                size += batch.nbytes
                if size >= BATCH_BYTES:
                    writer.write_table(pa.Table.from_batches(gathered, schema).combine_chunks())
                    gathered, size = [], 0
            if gathered:
                writer.write_table(pa.Table.from_batches(gathered, schema).combine_chunks())
        _WRITTEN[os.path.abspath(path)] = sink.result()
    return _WRITTEN[os.path.abspath(path)]


def written_digest(path: str) -> tuple[str, int]:
    """The checksum and size of the file at ``path``: as ``write_batches`` took them, else read once now
    (a file another writer made, such as datasets' ``map``)."""
    known = _WRITTEN.pop(os.path.abspath(path), None)
    if known is not None and known[1] == os.path.getsize(path):
        return known
    return file_digest(path)

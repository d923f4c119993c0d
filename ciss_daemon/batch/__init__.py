"""Taking batches in: the batch format and its validation, the inbox."""

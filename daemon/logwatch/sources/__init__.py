"""Where mail log lines come from: CloudWatch Logs, a followed file, standard input.

Every source is an async iterator of batches (lists of lines without newlines);
a batch, even an empty one, means the source was read successfully just now.
"""

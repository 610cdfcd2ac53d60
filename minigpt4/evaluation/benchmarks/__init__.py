"""Standard VLM benchmarks for evaluate.py (benchmark=NAME, conf/benchmark/*.yaml):
readers.py and answers.py read the files researchers have, benchmark.py turns their rows into
the evaluate recipe's rows, scorers.py scores them as each benchmark's own evaluation does."""

"""`python export/search.py` in a checkout: the `instdisc-search` command.

Its flags and docs: tf_instdisc/cli/search.py.
"""

from tf_instdisc.cli import search

if __name__ == "__main__":
  search.run()

"""`python export/export.py` in a checkout: the `instdisc-export` command.

Its flags and docs: tf_instdisc/cli/export.py.
"""

from tf_instdisc.cli import export

if __name__ == "__main__":
  export.run()

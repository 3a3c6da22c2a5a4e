"""`python train.py` in a checkout: the `instdisc-train` command.

Its flags and docs: tf_instdisc/cli/train.py.
"""

from tf_instdisc.cli import train

if __name__ == "__main__":
  train.run()

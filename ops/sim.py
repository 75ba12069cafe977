"""`python -m ops.sim`: kept for habit; the simulator is `bulwark.sim` (`python -m bulwark.sim`)."""

from bulwark.sim import main

if __name__ == "__main__":
    main()

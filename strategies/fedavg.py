"""FedAvg (McMahan et al., 2017) in the PSSFL alternate-training loop: the base class unchanged."""

from strategies.base import Strategy


class FedAvg(Strategy):
    name = "fedavg"

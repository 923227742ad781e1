"""Flower app: FedAvg on mnist5k with fedcompress upstream compression."""

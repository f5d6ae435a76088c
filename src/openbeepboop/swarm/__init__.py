"""The swarm (docs/swarm.md): servers that find each other over a Kademlia DHT.

Shared by the server (a member publishes its record and reads the others') and the
client (discovery from a bootstrap address). `records` and `secret` import nothing
heavy; `dht` needs the `swarm` extra (kademlia)."""

"""The key oracle: the one process that holds private keys and answers
semantic private-key operations over the ring or the socket.
"""

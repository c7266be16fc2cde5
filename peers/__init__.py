"""Real peers, provisioned by the project's own scripts: qemu-storage-daemon, DPDK's vhost_blk
example, QEMU 11.1.3 in a Debian 13 root, and the tiny guest. Locating and supervising them."""

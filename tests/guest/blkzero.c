/* blkzero: makes the guest kernel send virtio-blk WRITE_ZEROES, which busybox cannot.
 * Usage: blkzero zero|punch DEVICE OFFSET LENGTH
 *   zero  -> fallocate(FALLOC_FL_ZERO_RANGE): WRITE_ZEROES without unmap
 *   punch -> fallocate(FALLOC_FL_PUNCH_HOLE): WRITE_ZEROES with unmap allowed
 * Built statically by the qcow2 guest test and handed to the guest on a raw disk. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <linux/falloc.h>

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: blkzero zero|punch DEVICE OFFSET LENGTH\n");
        return 2;
    }
    int mode = FALLOC_FL_KEEP_SIZE;
    if (strcmp(argv[1], "zero") == 0)
        mode |= FALLOC_FL_ZERO_RANGE;
    else if (strcmp(argv[1], "punch") == 0)
        mode |= FALLOC_FL_PUNCH_HOLE;
    else
        return 2;
    int fd = open(argv[2], O_RDWR);
    if (fd < 0 || fallocate(fd, mode, strtoll(argv[3], 0, 0), strtoll(argv[4], 0, 0)) != 0) {
        perror("blkzero");
        return 1;
    }
    return fsync(fd) == 0 ? 0 : 1;
}

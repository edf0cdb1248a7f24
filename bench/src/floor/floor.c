/* The physical floor of a no-op run (converge-bench noop): what a correct agent cannot avoid.
 * Reads a manifest (for each file: u32 path length, path, u32 mode, u32 content length,
 * content; little endian), and for each file lstat()s it, checks type, mode and size, reads it
 * and memcmp()s it with the content. Exit 0 when every file matches, 1 otherwise. No parsing,
 * no hashing, no allocation beyond the manifest and one buffer. */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static uint32_t u32(const unsigned char *p) { return p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24; }

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    int fd = open(argv[1], O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) return 2;
    unsigned char *m = malloc(st.st_size);
    if (!m || read(fd, m, st.st_size) != st.st_size) return 2;
    close(fd);
    static unsigned char buf[1 << 20];
    char path[4096];
    int bad = 0;
    for (size_t at = 0; at < (size_t)st.st_size;) {
        uint32_t plen = u32(m + at);
        memcpy(path, m + at + 4, plen);
        path[plen] = 0;
        uint32_t mode = u32(m + at + 4 + plen), clen = u32(m + at + 8 + plen);
        const unsigned char *want = m + at + 12 + plen;
        at += 12 + plen + clen;
        struct stat s;
        if (lstat(path, &s) != 0 || !S_ISREG(s.st_mode) || (s.st_mode & 07777) != mode || s.st_size != clen) {
            bad = 1;
            continue;
        }
        int f = open(path, O_RDONLY | O_NOFOLLOW);
        if (f < 0) { bad = 1; continue; }
        ssize_t n = read(f, buf, sizeof buf);
        close(f);
        if (n != (ssize_t)clen || memcmp(buf, want, clen) != 0) bad = 1;
    }
    return bad;
}

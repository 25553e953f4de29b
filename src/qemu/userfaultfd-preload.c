/*
 * Lets a qemu that predates /dev/userfaultfd (7.2 calls the userfaultfd system call itself)
 * create its userfaultfds through a /dev/userfaultfd descriptor the agent opened and handed it:
 * the kernel's way (6.1 and later) to grant userfaultfd to one process where
 * vm.unprivileged_userfaultfd=0 keeps it from the rest. The grant is what qemu 8.1 and later
 * take by opening the device themselves; it covers only the caller's own memory.
 *
 * Loaded by the agent with LD_PRELOAD; KVM_MIGRATE_USERFAULTFD_FD names the inherited
 * descriptor. Every other system call goes to libc's syscall() unchanged.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <linux/userfaultfd.h>

static long (*libc_syscall)(long, ...);
static int device_fd = -1;

__attribute__((constructor)) static void find_device(void)
{
    libc_syscall = (long (*)(long, ...))dlsym(RTLD_NEXT, "syscall");
    const char *value = getenv("KVM_MIGRATE_USERFAULTFD_FD");
    if (value && *value) {
        char *end;
        long fd = strtol(value, &end, 10);
        if (*end == '\0' && fd >= 0 && fd < 65536) device_fd = (int)fd;
    }
}

long syscall(long number, ...)
{
    /* As libc's own wrapper does: six arguments, whatever the call takes. */
    va_list ap;
    va_start(ap, number);
    long a = va_arg(ap, long), b = va_arg(ap, long), c = va_arg(ap, long);
    long d = va_arg(ap, long), e = va_arg(ap, long), f = va_arg(ap, long);
    va_end(ap);
    if (number == SYS_userfaultfd && device_fd >= 0) return ioctl(device_fd, USERFAULTFD_IOC_NEW, (int)a);
    if (!libc_syscall) {
        errno = ENOSYS;
        return -1;
    }
    return libc_syscall(number, a, b, c, d, e, f);
}

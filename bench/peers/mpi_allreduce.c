/*
 * mpi_allreduce: the Open MPI peer that gantry's all_reduce is compared with.
 *
 * Build:  mpicc -O3 -o target/peers/mpi_allreduce bench/peers/mpi_allreduce.c
 *         (scripts/setup.sh does this)
 * Run:    mpirun --allow-run-as-root -np 2 target/peers/mpi_allreduce \
 *             --sizes 1K,64M,256M [--iters 20] [--warmup 5] [--dtype f32|f64] [--json]
 *
 * For each size (bytes; K/M/G suffixes are powers of 1024) it times
 * MPI_Allreduce(MPI_IN_PLACE, buf, count, MPI_FLOAT|MPI_DOUBLE, MPI_SUM).
 *
 * Timing method (same idea as gantry's `bench collectives`):
 *   - `warmup` untimed calls, then MPI_Barrier;
 *   - every timed iteration is timed separately on every rank with MPI_Wtime
 *     (no barrier inside the loop, so back-to-back calls pipeline as they
 *     would in a training step);
 *   - afterwards the per-iteration times are reduced with MPI_MAX over ranks
 *     (an all-reduce is finished only when the slowest rank is), and rank 0
 *     reports the MEDIAN of those per-iteration maxima as time_us, plus
 *     their mean as mean_us.
 *   algbw = bytes / time (GB/s, 1e9), busbw = algbw * 2(n-1)/n  (nccl-tests).
 *
 * The timed buffer holds zeros, so the in-place sum stays zero however many
 * iterations run (no overflow to inf, no denormals; float adds cost the same
 * for any normal value). Correctness is checked once per size after timing:
 * every rank re-fills its buffer with rank+1, runs one more all-reduce and
 * checks n(n+1)/2 at a few positions on every rank; `ok` is the AND over
 * ranks. The process exits 1 if any check failed.
 *
 * Output (rank 0 only): a table like nccl-tests, or with --json one object per
 * line:
 *   {"impl":"openmpi","op":"all_reduce","bytes":..,"world":..,"time_us":..,
 *    "algbw_gbps":..,"busbw_gbps":..,"ok":true, ...extra keys}
 */
#include <mpi.h>

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_SIZES 64

static int rank_ = 0;

static void die(const char *msg) {
    if (rank_ == 0) fprintf(stderr, "mpi_allreduce: %s\n", msg);
    MPI_Abort(MPI_COMM_WORLD, 2);
    exit(2);
}

static void usage(void) {
    if (rank_ == 0)
        fprintf(stderr,
                "usage: mpi_allreduce [--sizes 1K,64M,256M] [--iters N] [--warmup N]\n"
                "                     [--dtype f32|f64] [--json]\n"
                "  sizes are bytes per rank; K/M/G suffixes are powers of 1024\n");
}

/* "1K" -> 1024, "64M" -> 67108864, "3" -> 3. Returns 0 on error. */
static uint64_t parse_size(const char *s) {
    char *end = NULL;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno != 0 || end == s) return 0;
    uint64_t mult = 1;
    if (*end != '\0') {
        switch (toupper((unsigned char)*end)) {
            case 'K': mult = 1ULL << 10; break;
            case 'M': mult = 1ULL << 20; break;
            case 'G': mult = 1ULL << 30; break;
            case 'B': mult = 1; break;
            default: return 0;
        }
        end++;
        /* allow "64MiB", "64MB", "64M" */
        if (*end == 'i' || *end == 'I') end++;
        if (*end == 'b' || *end == 'B') end++;
        if (*end != '\0') return 0;
    }
    return (uint64_t)v * mult;
}

static long parse_count(const char *s, const char *what) {
    char *end = NULL;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0' || v < 0) {
        if (rank_ == 0) fprintf(stderr, "mpi_allreduce: bad %s '%s'\n", what, s);
        usage();
        die("bad arguments");
    }
    return v;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void fill(void *buf, size_t count, int is_f64, double value) {
    if (is_f64) {
        double *p = buf;
        for (size_t i = 0; i < count; i++) p[i] = value;
    } else {
        float *p = buf;
        float v = (float)value;
        for (size_t i = 0; i < count; i++) p[i] = v;
    }
}

static double get(const void *buf, size_t i, int is_f64) {
    return is_f64 ? ((const double *)buf)[i] : (double)((const float *)buf)[i];
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int world = 1;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &world);

    const char *sizes_arg = "1K,64M,256M";
    long iters = 20, warmup = 5;
    int json = 0, is_f64 = 0;

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *val = NULL;
        /* accept both "--opt value" and "--opt=value" */
        const char *eq = strchr(a, '=');
        char key[64];
        if (strncmp(a, "--", 2) == 0 && eq && (size_t)(eq - a) < sizeof key) {
            memcpy(key, a, (size_t)(eq - a));
            key[eq - a] = '\0';
            val = eq + 1;
            a = key;
        }
#define NEED_VAL()                                                   \
    do {                                                             \
        if (!val) {                                                  \
            if (i + 1 >= argc) { usage(); die("missing value"); }    \
            val = argv[++i];                                         \
        }                                                            \
    } while (0)
        if (strcmp(a, "--sizes") == 0) {
            NEED_VAL();
            sizes_arg = val;
        } else if (strcmp(a, "--iters") == 0) {
            NEED_VAL();
            iters = parse_count(val, "--iters");
        } else if (strcmp(a, "--warmup") == 0) {
            NEED_VAL();
            warmup = parse_count(val, "--warmup");
        } else if (strcmp(a, "--dtype") == 0) {
            NEED_VAL();
            if (strcmp(val, "f32") == 0) is_f64 = 0;
            else if (strcmp(val, "f64") == 0) is_f64 = 1;
            else { usage(); die("--dtype must be f32 or f64"); }
        } else if (strcmp(a, "--json") == 0) {
            json = 1;
        } else if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            usage();
            MPI_Finalize();
            return 0;
        } else {
            if (rank_ == 0) fprintf(stderr, "mpi_allreduce: unknown argument '%s'\n", argv[i]);
            usage();
            die("bad arguments");
        }
#undef NEED_VAL
    }
    if (iters < 1) die("--iters must be >= 1");

    uint64_t sizes[MAX_SIZES];
    int nsizes = 0;
    {
        char *copy = strdup(sizes_arg);
        char *save = NULL;
        for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
            if (nsizes == MAX_SIZES) die("too many sizes");
            uint64_t b = parse_size(tok);
            if (b == 0) {
                if (rank_ == 0) fprintf(stderr, "mpi_allreduce: bad size '%s'\n", tok);
                die("bad --sizes");
            }
            sizes[nsizes++] = b;
        }
        free(copy);
        if (nsizes == 0) die("empty --sizes");
    }

    const size_t esize = is_f64 ? sizeof(double) : sizeof(float);
    MPI_Datatype mtype = is_f64 ? MPI_DOUBLE : MPI_FLOAT;
    const char *dtype_name = is_f64 ? "f64" : "f32";
    double *t = malloc((size_t)iters * sizeof(double));
    double *tmax = malloc((size_t)iters * sizeof(double));
    if (!t || !tmax) die("out of memory (timings)");

    if (rank_ == 0 && !json) {
        char version[MPI_MAX_LIBRARY_VERSION_STRING];
        int vlen = 0;
        MPI_Get_library_version(version, &vlen);
        char *nl = strchr(version, '\n');
        if (nl) *nl = '\0';
        char *comma = strchr(version, ',');
        if (comma) *comma = '\0';
        printf("# mpi_allreduce: %s, world %d, dtype %s, iters %ld, warmup %ld, op sum, in place\n",
               version, world, dtype_name, iters, warmup);
        printf("# time_us = median over iterations of (max over ranks of that iteration's time)\n");
        printf("# %10s %12s %6s %12s %12s %10s %10s %4s\n", "size", "count", "type", "time_us",
               "mean_us", "algbw", "busbw", "ok");
        printf("# %10s %12s %6s %12s %12s %10s %10s %4s\n", "(B)", "(elems)", "", "(median)", "",
               "(GB/s)", "(GB/s)", "");
        fflush(stdout);
    }

    int all_ok = 1;
    for (int s = 0; s < nsizes; s++) {
        uint64_t count64 = sizes[s] / esize;
        if (count64 == 0) count64 = 1;
        if (count64 > (uint64_t)INT_MAX) die("size too large (count must fit in an int)");
        const int count = (int)count64;
        const uint64_t bytes = count64 * esize;

        void *buf = malloc((size_t)bytes);
        if (!buf) die("out of memory (buffer)");
        fill(buf, (size_t)count, is_f64, 0.0); /* also faults the pages in */

        for (long i = 0; i < warmup; i++)
            MPI_Allreduce(MPI_IN_PLACE, buf, count, mtype, MPI_SUM, MPI_COMM_WORLD);
        MPI_Barrier(MPI_COMM_WORLD);
        for (long i = 0; i < iters; i++) {
            double t0 = MPI_Wtime();
            MPI_Allreduce(MPI_IN_PLACE, buf, count, mtype, MPI_SUM, MPI_COMM_WORLD);
            t[i] = MPI_Wtime() - t0;
        }
        MPI_Reduce(t, tmax, (int)iters, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);

        /* correctness: re-fill with rank+1, one more all-reduce, check n(n+1)/2 */
        fill(buf, (size_t)count, is_f64, (double)(rank_ + 1));
        MPI_Allreduce(MPI_IN_PLACE, buf, count, mtype, MPI_SUM, MPI_COMM_WORLD);
        const double expect = (double)world * (double)(world + 1) / 2.0;
        size_t probes[] = {0, (size_t)count / 3, (size_t)count / 2, (size_t)count - 1,
                           (size_t)(((uint64_t)count * 7919u + (uint64_t)rank_ * 104729u) % (uint64_t)count)};
        int ok = 1;
        for (size_t p = 0; p < sizeof probes / sizeof probes[0]; p++)
            if (get(buf, probes[p], is_f64) != expect) ok = 0;
        int ok_all = 0;
        MPI_Reduce(&ok, &ok_all, 1, MPI_INT, MPI_LAND, 0, MPI_COMM_WORLD);
        free(buf);

        if (rank_ == 0) {
            if (!ok_all) all_ok = 0;
            double mean = 0.0;
            for (long i = 0; i < iters; i++) mean += tmax[i];
            mean /= (double)iters;
            qsort(tmax, (size_t)iters, sizeof(double), cmp_double);
            double median = (iters % 2) ? tmax[iters / 2]
                                        : 0.5 * (tmax[iters / 2 - 1] + tmax[iters / 2]);
            double algbw = median > 0 ? (double)bytes / median / 1e9 : 0.0;
            double busbw = algbw * 2.0 * (double)(world - 1) / (double)world;
            if (json) {
                printf("{\"impl\":\"openmpi\",\"op\":\"all_reduce\",\"bytes\":%llu,\"world\":%d,"
                       "\"time_us\":%.3f,\"algbw_gbps\":%.4f,\"busbw_gbps\":%.4f,\"ok\":%s,"
                       "\"dtype\":\"%s\",\"count\":%d,\"iters\":%ld,\"warmup\":%ld,"
                       "\"mean_us\":%.3f,\"min_us\":%.3f,\"max_us\":%.3f,"
                       "\"timing\":\"median_of_max_over_ranks\"}\n",
                       (unsigned long long)bytes, world, median * 1e6, algbw, busbw,
                       ok_all ? "true" : "false", dtype_name, count, iters, warmup, mean * 1e6,
                       tmax[0] * 1e6, tmax[iters - 1] * 1e6);
            } else {
                printf("  %10llu %12d %6s %12.2f %12.2f %10.3f %10.3f %4s\n", (unsigned long long)bytes, count, dtype_name,
                       median * 1e6, mean * 1e6, algbw, busbw, ok_all ? "ok" : "FAIL");
            }
            fflush(stdout);
        }
    }

    free(t);
    free(tmax);
    int rc = 0;
    if (rank_ == 0 && !all_ok) {
        fprintf(stderr, "mpi_allreduce: correctness check FAILED\n");
        rc = 1;
    }
    MPI_Bcast(&rc, 1, MPI_INT, 0, MPI_COMM_WORLD);
    MPI_Finalize();
    return rc;
}

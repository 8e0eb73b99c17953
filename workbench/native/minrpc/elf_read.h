/*
 * elf_read.h: the bounds-checked ELF header and section-table reader that elf.c and tar.c share
 * (private to those two files; minrpc.h is the contract with the core).
 *
 * Every offset and size read from a file is checked against the file's size before it is used, so
 * a malformed or truncated file is reported, never read out of bounds.
 */
#ifndef MINRPC_ELF_READ_H
#define MINRPC_ELF_READ_H

#include <stddef.h>
#include <stdint.h>

#include "minrpc.h"

#define MR_ET_REL 1
#define MR_ET_EXEC 2
#define MR_ET_DYN 3
#define MR_SHT_SYMTAB 2
#define MR_SHT_NOBITS 8
#define MR_SHT_DYNSYM 11

/* What the ELF header says (the fields a loader or a linker looks at). */
typedef struct {
    uint8_t ident[16];   /* the first bytes of the file (fewer when it is shorter: ident_len) */
    size_t ident_len;
    mr_elf_kind kind;
    int version;         /* e_ident[EI_VERSION] */
    int type;            /* e_type */
    uint64_t shoff;      /* e_shoff */
    unsigned ehsize;     /* e_ehsize */
    unsigned shentsize;  /* e_shentsize */
    uint32_t shnum;      /* e_shnum (0: see section 0, or no sections) */
    uint32_t shstrndx;   /* e_shstrndx */
} mr_elf_header;

/* One section header. */
typedef struct {
    uint32_t name, type, link;
    uint64_t addr, offset, size, entsize;
} mr_elf_section;

/* Why a file is not a well-formed ELF file (mr_elf_read_header / mr_elf_read_sections). */
enum {
    MR_ELF_OK = 0,
    MR_ELF_NOT_ELF,        /* no \x7fELF magic */
    MR_ELF_BAD_IDENT,      /* class, data or version out of range */
    MR_ELF_TRUNCATED,      /* the file ends inside the ELF header */
    MR_ELF_BAD_HEADER,     /* e_ehsize / e_shentsize / e_shoff inconsistent with the class */
    MR_ELF_TABLE_PAST_END, /* the section table's first entry lies past the end of the file */
    MR_ELF_TABLE_TOO_BIG,  /* shnum sections (or shstrndx) do not fit in the file */
    MR_ELF_SECTION_PAST_END, /* a section's contents run past the end of the file (index in *bad_index) */
    MR_ELF_IO,             /* reading failed (errno) */
    MR_ELF_NO_MEMORY,
};

/* pread exactly n bytes at off: 0, or -1 (a short file, or errno). */
int mr_pread_full(int fd, void* buf, size_t n, uint64_t off);
/* Read the identification and the header of the ELF file fd of `size` bytes: MR_ELF_OK or why not. */
int mr_elf_read_header(int fd, uint64_t size, mr_elf_header* h);
/* Read the section table (h from mr_elf_read_header; extended numbering resolved into h->shnum and
   h->shstrndx): MR_ELF_OK with *out malloc'ed (h->shnum entries), or why not (*bad_index: the section).
   Every section but SHT_NOBITS (and section 0) lies inside the file on success. */
int mr_elf_read_sections(int fd, uint64_t size, mr_elf_header* h, mr_elf_section** out, uint32_t* bad_index);
/* The name of the machine for messages ("x86_64", "aarch64", "ELF machine N"): Python's modules.MACHINES. */
const char* mr_elf_machine_name(int machine, char* buf, size_t len);

#endif

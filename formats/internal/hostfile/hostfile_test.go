package hostfile

import (
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

func TestHostFile(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "img"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	data := bytes.Repeat([]byte{0xab}, 16384)
	if err := WriteFull(f, data, 0); err != nil {
		t.Fatal(err)
	}
	if err := Fdatasync(f); err != nil {
		t.Fatal(err)
	}
	if n, err := Size(f); err != nil || n != 16384 {
		t.Fatalf("Size = %d, %v", n, err)
	}

	// Past the end: ReadFull fails naming the range, ReadZeroed zero-fills.
	p := bytes.Repeat([]byte{1}, 8192)
	if err := ReadFull(f, p, 12288); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("ReadFull past EOF: %v", err)
	}
	if err := ReadZeroed(f, p, 12288); err != nil || !bytes.Equal(p[:4096], data[:4096]) || !bytes.Equal(p[4096:], make([]byte, 4096)) {
		t.Errorf("ReadZeroed past EOF: %v", err)
	}
	if err := ReadFull(f, p[:4096], 0); err != nil || !bytes.Equal(p[:4096], data[:4096]) {
		t.Errorf("ReadFull inside: %v", err)
	}

	// A punched range reads as zeros and the size stays.
	err = PunchHole(f, 4096, 4096)
	if errors.Is(err, unix.EOPNOTSUPP) {
		t.Log("this file system cannot punch holes; the rest is checked")
		return
	}
	if err != nil {
		t.Fatal(err)
	}
	if err := ReadFull(f, p[:4096], 4096); err != nil || !bytes.Equal(p[:4096], make([]byte, 4096)) {
		t.Errorf("punched range: %v", err)
	}
	if n, _ := Size(f); n != 16384 {
		t.Errorf("size after punch %d", n)
	}
}

// shortWriter writes half of what it is given and says nothing.
type shortWriter struct{}

func (shortWriter) WriteAt(p []byte, off int64) (int, error) { return len(p) / 2, nil }

func TestWriteFullShort(t *testing.T) {
	if err := WriteFull(shortWriter{}, make([]byte, 8), 0); !errors.Is(err, io.ErrShortWrite) {
		t.Errorf("short write: %v", err)
	}
}

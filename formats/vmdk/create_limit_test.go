package vmdk

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/blktap-go/blktap/formats/image"
)

// Issue 16 item 5: Create refuses a size whose grain directory Open would
// refuse, instead of leaving an image nothing can serve. At the largest
// size Create takes, the header it lays out passes Open's checks.
func TestCreateRefusesWhatOpenRefuses(t *testing.T) {
	dir := t.TempDir()
	for _, grain := range []int64{4 << 10, 64 << 10, 1 << 20} {
		grainSec := grain / sectorSize
		most := int64(maxGDEntries) * 512 * grain // NumGTEsPerGT is 512
		h := sparseLayout(most/sectorSize, grainSec, embedDescSec, false)
		if _, err := parseSparseHeader(h.marshal(), 0); err != nil {
			t.Errorf("grain %d: the largest size's header: %v", grain, err)
		}
		over := sparseLayout(most/sectorSize+1, grainSec, embedDescSec, false)
		if _, err := parseSparseHeader(over.marshal(), 0); err == nil {
			t.Errorf("grain %d: open takes %d bytes: the limit moved", grain, most+sectorSize)
		}
		p := filepath.Join(dir, "big.vmdk")
		err := Create(p, CreateOptions{Size: most + sectorSize, ClusterSize: grain})
		if !errors.Is(err, image.ErrUnsupported) || !strings.Contains(err.Error(), "grain tables") {
			t.Errorf("grain %d, %d bytes: %v", grain, most+sectorSize, err)
		}
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("grain %d: a refused create left a file (%v)", grain, err)
		}
	}
	// The report's case: 600 TiB at the default grain was made, then
	// refused by every open.
	p := filepath.Join(dir, "600T.vmdk")
	if err := Create(p, CreateOptions{Size: 600 << 40}); !errors.Is(err, image.ErrUnsupported) {
		t.Errorf("600 TiB: %v", err)
	}
}

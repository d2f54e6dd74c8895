package image

import "fmt"

// Empty is a drive with no medium: a CD-ROM drive that a toolstack
// declares before a disc is inserted. It has no sectors, so every read,
// write or discard of a byte is out of range, and it is read-only: there
// is nothing to write to.
type Empty struct{}

func (Empty) Size() int64 { return 0 }

func (Empty) ReadAt(p []byte, off int64) (int, error) {
	if len(p) == 0 && off == 0 {
		return 0, nil
	}
	return 0, fmt.Errorf("no medium: %w", CheckRange(off, len(p), 0))
}

func (Empty) WriteAt(p []byte, off int64) (int, error) {
	return 0, fmt.Errorf("no medium: %w", ErrReadOnly)
}

func (Empty) Flush() error { return nil }

func (Empty) Discard(off, length int64) error {
	return fmt.Errorf("no medium: %w", ErrReadOnly)
}

func (Empty) Map(off, length int64) ([]Extent, error) {
	if err := CheckRange64(off, length, 0); err != nil {
		return nil, err
	}
	return nil, nil
}

func (Empty) Close() error { return nil }

//go:build race

package vmdk

// raceEnabled trims the slowest deterministic loops under -race, where
// they cost ten times more and find no more races.
const raceEnabled = true
